"""Layer tarballs: safe extraction, whiteouts, flattening and reproducible rewriting."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from forge.formats.image.errors import UnsafeLayerError
from forge.formats.image.layer_read import apply_layers, safe_extract
from forge.formats.image.layer_write import flatten, layer_from_dir, normalise
from forge.formats.image.spec import OCI_LAYER as MEDIA_TYPE_TAR
from forge.formats.image.spec import OCI_LAYER_GZIP as MEDIA_TYPE_TAR_GZIP


def make_tar(entries, *, gz=False, fmt=tarfile.PAX_FORMAT) -> bytes:
    """entries: (name, kind, payload, extra) where kind is f, d, l (symlink), h, c, b, p."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            name, kind, payload = e[:3]
            extra = e[3] if len(e) > 3 else {}
            t = tarfile.TarInfo(name)
            t.mtime = extra.get("mtime", 1_600_000_000)
            t.mode = extra.get("mode", 0o755 if kind == "d" else 0o644)
            t.uid, t.gid = extra.get("uid", 0), extra.get("gid", 0)
            t.uname = extra.get("uname", "")
            data = None
            if kind == "f":
                data = payload if isinstance(payload, bytes) else payload.encode()
                t.size = len(data)
            elif kind == "d":
                t.type = tarfile.DIRTYPE
            elif kind == "l":
                t.type, t.linkname = tarfile.SYMTYPE, payload
            elif kind == "h":
                t.type, t.linkname = tarfile.LNKTYPE, payload
            elif kind in "cb":
                t.type = tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE
                t.devmajor, t.devminor = payload
            elif kind == "p":
                t.type = tarfile.FIFOTYPE
            t.pax_headers = extra.get("pax", {})
            tf.addfile(t, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw) if gz else raw


def write(tmp_path: Path, name: str, entries, **kw) -> Path:
    p = tmp_path / name
    p.write_bytes(make_tar(entries, **kw))
    return p


def tree(root: Path) -> dict[str, str]:
    """path -> 'd', 'l:<target>' or 'f:<content>' for everything below root."""
    out = {}
    for top, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(top, n)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "l:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "d"
            else:
                out[rel] = "f:" + p.read_text()
    return out


def tar_tree(data: bytes) -> dict[str, str]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf:
            name = m.name.rstrip("/")
            if m.isdir():
                out[name] = "d"
            elif m.issym():
                out[name] = "l:" + m.linkname
            elif m.islnk():
                out[name] = out[m.linkname]
            elif m.isreg():
                out[name] = "f:" + tf.extractfile(m).read().decode()
    return out


# ---- escapes ------------------------------------------------------------------------

def test_dotdot_member_is_refused(tmp_path):
    layer = write(tmp_path, "l.tar", [("../escape", "f", "x")])
    with pytest.raises(UnsafeLayerError, match=r"'\.\./escape'.*\.\."):
        safe_extract(layer, tmp_path / "root")
    assert not (tmp_path / "escape").exists()


def test_absolute_and_dot_names_are_normalised(tmp_path):
    layer = write(tmp_path, "l.tar", [("/abs/path", "f", "a"), ("./rel/file", "f", "b")])
    safe_extract(layer, tmp_path / "root")
    assert tree(tmp_path / "root") == {"abs": "d", "abs/path": "f:a", "rel": "d", "rel/file": "f:b"}


def test_write_through_absolute_symlink_stays_inside(tmp_path):
    outside = tmp_path / "etc"
    outside.mkdir()
    layer = write(tmp_path, "l.tar", [("etc", "d", None), ("link", "l", "/etc"),
                                      ("link/passwd", "f", "pwned"),
                                      ("up", "l", "/../.."), ("up/x", "f", "x")])
    root = tmp_path / "root"
    safe_extract(layer, root)
    assert os.readlink(root / "link") == "/etc"  # stored as it was
    assert (root / "etc" / "passwd").read_text() == "pwned"
    assert (root / "x").read_text() == "x"  # '..' above the root stops at the root
    assert list(outside.iterdir()) == [] and not (tmp_path / "x").exists()


def test_symlink_climbing_out_is_refused(tmp_path):
    layer = write(tmp_path, "l.tar", [("a/b", "d", None), ("a/b/x", "l", "../../../x")])
    with pytest.raises(UnsafeLayerError, match="outside the root"):
        safe_extract(layer, tmp_path / "root")
    ok = write(tmp_path, "ok.tar", [("a/b", "d", None), ("a/b/x", "l", "../../x")])
    safe_extract(ok, tmp_path / "root2")
    assert os.readlink(tmp_path / "root2/a/b/x") == "../../x"


def test_symlink_through_lower_symlink_is_judged_where_it_lands(tmp_path):
    root = tmp_path / "root"
    safe_extract(write(tmp_path, "1.tar", [("deep/er", "d", None), ("s", "l", "deep/er")]), root)
    safe_extract(write(tmp_path, "2.tar", [("s/x", "l", "../../y")]), root)
    assert os.readlink(root / "deep/er/x") == "../../y"


def test_hardlink_to_host_file_is_refused(tmp_path):
    layer = write(tmp_path, "l.tar", [("passwd", "h", "/etc/passwd")])
    with pytest.raises(UnsafeLayerError, match="hardlink target '/etc/passwd'"):
        safe_extract(layer, tmp_path / "root")
    assert not (tmp_path / "root" / "passwd").exists()


def test_hardlink_outside_is_refused(tmp_path):
    (tmp_path / "secret").write_text("s")
    layer = write(tmp_path, "l.tar", [("x", "h", "../secret")])
    with pytest.raises(UnsafeLayerError, match=r"\.\."):
        safe_extract(layer, tmp_path / "root")


def test_hardlink_inside_is_made(tmp_path):
    layer = write(tmp_path, "l.tar", [("a", "f", "data"), ("/b", "h", "/a")])
    root = tmp_path / "root"
    safe_extract(layer, root)
    assert os.path.samefile(root / "a", root / "b")


def test_devices_and_fifos_are_skipped(tmp_path):
    layer = write(tmp_path, "l.tar", [("dev/console", "c", (5, 1)), ("dev/sda", "b", (8, 0)),
                                      ("run/fifo", "p", None), ("ok", "f", "y")])
    root = tmp_path / "root"
    skipped = safe_extract(layer, root)
    assert skipped == ["dev/console", "dev/sda", "run/fifo"]
    assert not (root / "dev/console").exists() and not (root / "run/fifo").exists()
    assert (root / "ok").read_text() == "y"
    with pytest.raises(UnsafeLayerError, match="device nodes"):
        safe_extract(layer, tmp_path / "strict", strip_devices=False)


# ---- metadata -----------------------------------------------------------------------

def test_modes_setuid_and_mtimes_kept(tmp_path):
    layer = write(tmp_path, "l.tar", [
        ("bin", "d", None, {"mode": 0o555, "mtime": 1_000}),
        ("bin/su", "f", "su", {"mode": 0o4755, "mtime": 2_000, "uid": 1, "gid": 2}),
        ("tmp", "d", None, {"mode": 0o1777}),
    ])
    root = tmp_path / "root"
    safe_extract(layer, root)
    st = os.stat(root / "bin/su")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_mtime == 2_000
    assert stat.S_IMODE(os.stat(root / "bin").st_mode) == 0o555
    assert os.stat(root / "bin").st_mtime == 1_000
    assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o1777
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1, 2)


# ---- whiteouts ----------------------------------------------------------------------

def test_whiteout_removes_lower_file_and_dir(tmp_path):
    lower = write(tmp_path, "1.tar", [("etc/a", "f", "a"), ("etc/b", "f", "b"),
                                      ("var/cache/x", "f", "x")])
    upper = write(tmp_path, "2.tar", [("etc/.wh.a", "f", ""), ("var/.wh.cache", "f", ""),
                                      ("etc/.wh.missing", "f", "")])
    root = tmp_path / "root"
    apply_layers([lower, upper], root)
    assert tree(root) == {"etc": "d", "etc/b": "f:b", "var": "d"}


def test_whiteout_spares_its_own_layer(tmp_path):
    root = tmp_path / "root"
    apply_layers([write(tmp_path, "1.tar", [("a", "f", "old")]),
                  write(tmp_path, "2.tar", [("a", "f", "new"), (".wh.a", "f", "")])], root)
    assert (root / "a").read_text() == "new"


def test_opaque_directory(tmp_path):
    lower = write(tmp_path, "1.tar", [("d/old", "f", "o"), ("d/sub/old2", "f", "o"),
                                      ("keep", "f", "k")])
    upper = write(tmp_path, "2.tar", [("d", "d", None), ("d/new", "f", "n"),
                                      ("d/sub/new2", "f", "n"), ("d/.wh..wh..opq", "f", "")])
    root = tmp_path / "root"
    apply_layers([lower, upper], root)
    assert tree(root) == {"d": "d", "d/new": "f:n", "d/sub": "d", "d/sub/new2": "f:n",
                          "keep": "f:k"}


class NonSeekable(io.RawIOBase):
    def __init__(self, data: bytes):
        self.inner = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        data = self.inner.read(len(b))
        b[:len(data)] = data
        return len(data)


def test_extract_and_normalise_from_a_stream(tmp_path):
    data = make_tar([("d/f", "f", "x"), ("d/l", "h", "d/f")], gz=True)
    root = tmp_path / "root"
    safe_extract(NonSeekable(data), root)
    assert (root / "d/f").read_text() == "x" and os.path.samefile(root / "d/f", root / "d/l")
    a, b = io.BytesIO(), io.BytesIO()
    assert normalise(NonSeekable(data), a, mtime=1, compress=False) == \
        normalise(io.BytesIO(data), b, mtime=1, compress=False)
    assert a.getvalue() == b.getvalue()


def test_later_layer_replaces_types(tmp_path):
    root = tmp_path / "root"
    apply_layers([write(tmp_path, "1.tar", [("x/y", "f", "1"), ("z", "f", "2")]),
                  write(tmp_path, "2.tar", [("x", "f", "file"), ("z", "d", None),
                                            ("z/w", "f", "3")], gz=True)], root)
    assert tree(root) == {"x": "f:file", "z": "d", "z/w": "f:3"}


# ---- normalise ----------------------------------------------------------------------

def test_normalise_is_reproducible(tmp_path):
    a = [("usr", "d", None, {"mtime": 5}), ("usr/bin", "d", None),
         ("usr/bin/tool", "f", "t", {"mtime": 7, "uname": "alice", "mode": 0o4755}),
         ("usr/bin/alias", "h", "usr/bin/tool"),
         ("x" * 150, "f", "long"),
         ("cap", "f", "c", {"pax": {"SCHILY.xattr.security.capability": "\x01\x02"}})]
    b = [a[4], ("./usr/bin/tool", "f", "t", {"mtime": 99, "uname": "bob", "mode": 0o4755}),
         a[5], ("usr/bin/alias", "h", "usr/bin/tool"), ("/usr/", "d", None, {"mtime": 1}),
         a[1]]
    outs = []
    for i, entries in enumerate([a, b, a]):
        buf = io.BytesIO()
        info = normalise(io.BytesIO(make_tar(entries, gz=i == 1)), buf, mtime=1234,
                         compress=True)
        outs.append((buf.getvalue(), info))
    assert outs[0] == outs[1] == outs[2]
    data, info = outs[0]
    assert info.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert info.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()
    assert info.size == len(data) and info.media_type == MEDIA_TYPE_TAR_GZIP
    assert data[4:8] == b"\0\0\0\0" and not data[3] & 0x08  # gzip: no mtime, no name
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        ms = tf.getmembers()
    names = [m.name for m in ms]
    assert names == ["cap", "usr", "usr/bin", "usr/bin/alias", "usr/bin/tool", "x" * 150]
    assert {m.mtime for m in ms} == {1234} and {m.uname for m in ms} == {""}
    assert ms[3].isreg() and ms[4].islnk() and ms[4].linkname == "usr/bin/alias"
    assert ms[3].mode == 0o4755
    assert ms[0].pax_headers == {"SCHILY.xattr.security.capability": "\x01\x02"}


def test_normalise_uncompressed(tmp_path):
    buf = io.BytesIO()
    info = normalise(io.BytesIO(make_tar([("a", "f", "x")])), buf, mtime=0, compress=False)
    assert info.media_type == MEDIA_TYPE_TAR and info.digest == info.diff_id


# ---- flatten ------------------------------------------------------------------------

def test_flatten_matches_extract_then_tar(tmp_path):
    layers = [
        write(tmp_path, "1.tar", [("etc", "d", None), ("etc/a", "f", "a"), ("etc/b", "f", "b"),
                                  ("opt/d/old", "f", "o"), ("lib", "d", None),
                                  ("lib/libc", "f", "libc"), ("lib64", "l", "lib"),
                                  ("bin/sh", "f", "sh"), ("bin/ash", "h", "bin/sh"),
                                  ("dev/null", "c", (1, 3))]),
        write(tmp_path, "2.tar", [("etc/.wh.a", "f", ""), ("opt/d/.wh..wh..opq", "f", ""),
                                  ("opt/d/new", "f", "n"), ("lib64/libm", "f", "m"),
                                  ("bin/sh", "f", "sh2"), ("etc/b", "f", "b2")], gz=True),
        write(tmp_path, "3.tar", [("z/y/x", "f", "deep"), ("etc/link", "l", "/etc/b")]),
    ]
    root = tmp_path / "root"
    apply_layers(layers, root)
    flat = io.BytesIO()
    info = flatten(layers, flat)
    assert info.media_type == MEDIA_TYPE_TAR
    assert tar_tree(flat.getvalue()) == tree(root)
    assert tree(root)["bin/ash"] == "f:sh"  # the link kept the old inode
    with tarfile.open(fileobj=io.BytesIO(flat.getvalue())) as tf:
        names = tf.getnames()
        assert tf.getmember("dev/null").ischr()
    assert names == sorted(names, key=lambda n: n.split("/"))
    again = io.BytesIO()
    flatten(layers, again)
    assert again.getvalue() == flat.getvalue()
    from_disk = io.BytesIO()
    layer_from_dir(root, from_disk, mtime=0, compress=False)
    assert tar_tree(from_disk.getvalue()) == tree(root)


def test_flatten_refuses_escapes(tmp_path):
    with pytest.raises(UnsafeLayerError):
        flatten([write(tmp_path, "1.tar", [("a/../../b", "f", "")])], io.BytesIO())


# ---- layer_from_dir -----------------------------------------------------------------

def test_layer_from_dir(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub/f").write_text("f")
    (src / "sub/g").write_text("g")
    os.link(src / "sub/g", src / "h")
    os.symlink("sub/f", src / "s")
    os.utime(src / "sub/f", (5, 5))
    outs = []
    for _ in range(2):
        buf = io.BytesIO()
        info = layer_from_dir(src, buf, prefix="/opt/app", uid=10, gid=20, mtime=42,
                              mode_override=0o750)
        outs.append((buf.getvalue(), info))
        os.utime(src / "sub/f", (99, 99))
    assert outs[0] == outs[1]
    with tarfile.open(fileobj=io.BytesIO(outs[0][0])) as tf:
        ms = {m.name: m for m in tf}
    assert sorted(ms) == ["opt/app/h", "opt/app/s", "opt/app/sub", "opt/app/sub/f",
                          "opt/app/sub/g"]
    assert ms["opt/app/sub/g"].islnk() and ms["opt/app/sub/g"].linkname == "opt/app/h"
    assert ms["opt/app/s"].linkname == "sub/f"
    assert {(m.uid, m.gid, m.mtime) for m in ms.values()} == {(10, 20, 42)}
    assert ms["opt/app/sub/f"].mode == 0o750 and ms["opt/app/sub"].mode == 0o750


def test_symlink_loops_and_file_parents_are_errors(tmp_path):
    loop = write(tmp_path, "loop.tar", [("a", "l", "b"), ("b", "l", "a"), ("a/x", "f", "y")])
    with pytest.raises(UnsafeLayerError, match="too many levels"):
        safe_extract(loop, tmp_path / "r1")
    under_file = write(tmp_path, "file.tar", [("f", "f", "x"), ("f/x", "f", "y")])
    with pytest.raises(UnsafeLayerError, match="not a directory"):
        safe_extract(under_file, tmp_path / "r2")
    with pytest.raises(UnsafeLayerError, match="not a directory"):
        flatten([under_file], io.BytesIO())


def test_chmod_leaves_the_parents_a_copy_creates(tmp_path):
    """COPY --chmod=0600 a /etc/conf/a: BuildKit makes etc/ and etc/conf/ 0755."""
    from forge.formats.image.layer_write import layer_from_dir
    src = tmp_path / "staging"
    (src / "etc/conf").mkdir(parents=True)
    (src / "etc/conf/a").write_text("x")
    (src / "etc").chmod(0o755)
    (src / "etc/conf").chmod(0o755)
    out = tmp_path / "layer.tar"
    with open(out, "wb") as f:
        layer_from_dir(src, f, mtime=0, compress=False, mode_override=0o600, override_under="/etc/conf/a")
    with tarfile.open(out) as t:
        modes = {m.name: m.mode for m in t.getmembers()}
    assert modes == {"etc": 0o755, "etc/conf": 0o755, "etc/conf/a": 0o600}


@pytest.mark.parametrize("member", [".wh...", "d/.wh...", "d/.wh.."])
def test_a_whiteout_of_dot_or_dotdot_deletes_nothing(tmp_path, member):
    """Found by tests/fuzz: `.wh...` whites out "..", and the extractor removed the
    destination's parent directory with everything in it."""
    victim = tmp_path / "victim"
    (victim / "dest" / "d").mkdir(parents=True)
    (victim / "keep").write_text("outside the destination")
    (victim / "dest" / "d" / "keep").write_text("inside")
    layer = write(tmp_path, "wh.tar", [(member, "f", "")])
    with pytest.raises(UnsafeLayerError, match="a whiteout must name an entry"):
        safe_extract(layer, victim / "dest")
    assert (victim / "keep").read_text() == "outside the destination"
    assert (victim / "dest" / "d" / "keep").read_text() == "inside"


def test_corrupt_layers_are_layer_errors_naming_the_layer(tmp_path):
    """Found by tests/fuzz: a bad deflate stream, a PAX number tarfile cannot read and an
    empty symlink target escaped as zlib, ValueError and FileNotFoundError exceptions."""
    from forge.formats.image.errors import ImageError
    good = gzip.compress(make_tar([("a", "f", "hello" * 200)]), mtime=0)
    bad_deflate = tmp_path / "deflate.tar.gz"
    bad_deflate.write_bytes(good[:12] + b"\xff" * 20 + good[32:])
    cases = [(bad_deflate, "is not a tar archive forge can read"),
             (write(tmp_path, "pax.tar", [("a", "f", "x", {"pax": {"GNU.sparse.size": "abc"}})]),
              "PAX header"),
             (write(tmp_path, "sym.tar", [("l", "l", "")]), "empty target")]
    for layer, message in cases:
        with pytest.raises(ImageError, match=message) as e:
            apply_layers([layer], tmp_path / "out")
        assert layer.name in str(e.value)
