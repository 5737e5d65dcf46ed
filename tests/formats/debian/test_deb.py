"""Debian packages and indexes: .deb files made by dpkg-deb, a mini archive over HTTP."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import lzma
import re
import threading
from pathlib import Path

import pytest

from debian_archive import Keys
from package_builders import make_deb
from forge.formats.debian.errors import DebError
from forge.formats.debian.archive import depends, download, fetch_index, resolve
from forge.formats.debian.deb822 import parse_stanzas
from forge.formats.debian.package import control_fields, open_data_tar, read_ar
from forge.formats.debian.version import compare_versions



@pytest.mark.parametrize("compression", ["xz", "gzip"])
def test_read_back_a_deb(tmp_path, compression):
    deb = make_deb(tmp_path, "hello", "1.0-1", compression,
                   {"usr/bin/hello": b"#!/bin/sh\necho hi\n", "etc/hello.conf": b"x=1\n"})
    with open(deb, "rb") as f:
        members = read_ar(f)
        assert [m.name for m in members][0] == "debian-binary"
        f.seek(members[0].offset)
        assert f.read(members[0].size) == b"2.0\n"
    suffix = {"xz": ".xz", "gzip": ".gz"}[compression]
    assert [m.name for m in members][1:] == [f"control.tar{suffix}", f"data.tar{suffix}"]
    fields = control_fields(deb)
    assert fields["Package"] == "hello" and fields["Version"] == "1.0-1"
    assert fields["Description"] == "a test package\nmade by the forge test suite.\n.\nSecond paragraph."
    with open_data_tar(deb) as tf:
        names = {m.name.lstrip("./"): m for m in tf}
        assert tf.extractfile(names["usr/bin/hello"]).read() == b"#!/bin/sh\necho hi\n"
        assert names["etc/hello.conf"].uid == 0


def test_zstd_deb(tmp_path):
    deb = make_deb(tmp_path, "z", "1", "zstd", {"usr/bin/z": b"zz\n"})
    assert control_fields(deb)["Package"] == "z"
    with open_data_tar(deb) as tf:
        assert tf.extractfile("./usr/bin/z").read() == b"zz\n"


def test_not_an_ar_archive(tmp_path):
    with pytest.raises(DebError, match="not an ar archive"):
        read_ar(io.BytesIO(b"PK\x03\x04 not a deb"))
    with pytest.raises(DebError, match="corrupt"):
        read_ar(io.BytesIO(b"!<arch>\nshort"))


def test_parse_stanzas():
    text = ("Package: a\nVersion: 1.0\nDescription: short\n long line one\n\tline two\n\n\n"
            "Package: b\nVersion: 2:1.0~rc1-3\nFilename: pool/main/b/b_1.0_amd64.deb\n"
            "SHA256: ab12\nSize: 42\n")
    got = parse_stanzas(text)
    assert got == [{"Package": "a", "Version": "1.0", "Description": "short\nlong line one\nline two"},
                   {"Package": "b", "Version": "2:1.0~rc1-3", "Filename": "pool/main/b/b_1.0_amd64.deb",
                    "SHA256": "ab12", "Size": "42"}]
    assert depends({"Depends": "libc6 (>= 2.36), foo:any | bar [amd64], baz"}) == \
        [["libc6"], ["foo", "bar"], ["baz"]]
    with pytest.raises(DebError):
        parse_stanzas(" continuation first\n")


# (older, newer) pairs, from Debian policy 5.6.12 and dpkg's own test suite
ORDERED = [
    ("1.0~rc1", "1.0"), ("1:0.9", "2:0.1"), ("2.0", "1:0.9"), ("1.0-1", "1.0-2"),
    ("2.0.1", "2.0.1a"), ("1.0~~", "1.0~"), ("1.0~", "1.0"), ("1.0", "1.0a"), ("1.0a", "1.0+"),
    ("1.0", "1.0.1"), ("1.9", "1.10"), ("1.0-1", "1.0-1.1"), ("1.0-9", "1.0-10"),
    ("6.1.0-21", "6.1.0-22"), ("6.1.90-1", "6.1.112-1"), ("1.0+b1", "1.0+b2"),
    ("1.0-1~bpo12+1", "1.0-1"), ("a", "b"), ("1.0", "1.0-0.1"), ("0:1.0-1", "1:0"),
]


@pytest.mark.parametrize("older,newer", ORDERED)
def test_compare_versions(older, newer):
    assert compare_versions(older, newer) == -1
    assert compare_versions(newer, older) == 1


@pytest.mark.parametrize("a,b", [("1.0", "0:1.0"), ("1.0", "1.0-"), ("1.01", "1.1"), ("1.0-0", "1.0")])
def test_equal_versions(a, b):
    assert compare_versions(a, b) == 0


def test_sorting_with_compare_versions():
    vs = ["1.0", "1.0~rc1", "1:0.1", "0.9", "1.0-1", "1.0+dfsg"]
    assert sorted(vs, key=functools.cmp_to_key(compare_versions)) == \
        ["0.9", "1.0~rc1", "1.0", "1.0-1", "1.0+dfsg", "1:0.1"]


# ---- a mini archive over HTTP -----------------------------------------------------------

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(root: Path) -> str:
        handler = functools.partial(_Quiet, directory=str(root))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/debian"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _stanza(deb: Path, root: Path) -> str:
    f = control_fields(deb)
    data = deb.read_bytes()
    rel = f"pool/main/{f['Package'][0]}/{f['Package']}/{deb.name}"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
    return "".join(f"{k}: {v}\n" for k, v in f.items() if k != "Description") + \
        f"Filename: {rel}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n" \
        f"Description: {f['Description'].splitlines()[0]}\n"


@pytest.fixture(scope="module")
def signer():
    keys = Keys()
    yield keys.key("archive")
    keys.close()


@pytest.fixture
def keyring(signer, tmp_path):
    return [signer.export(tmp_path / "archive.gpg")]


def make_archive(tmp: Path, debs: list[Path], key, *, signed=True, by_hash=False, gz=False,
                 tamper=None) -> Path:
    root = tmp / "www" / "debian"
    packages = "\n".join(_stanza(d, root) for d in debs)
    if tamper:
        packages = tamper(packages)
    data = gzip.compress(packages.encode()) if gz else lzma.compress(packages.encode())
    index = f"main/binary-amd64/Packages.{'gz' if gz else 'xz'}"
    dists = root / "dists" / "bookworm"
    sha = hashlib.sha256(data).hexdigest()
    target = dists / (f"main/binary-amd64/by-hash/SHA256/{sha}" if by_hash else index)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    release = (f"Origin: Forge\nSuite: bookworm\nCodename: bookworm\n"
               f"{'Acquire-By-Hash: yes' if by_hash else 'Acquire-By-Hash: no'}\n"
               f"MD5Sum:\n {hashlib.md5(data).hexdigest()} {len(data)} {index}\n"
               f"SHA256:\n {'0' * 64} 10 contrib/binary-amd64/Packages\n {sha} {len(data)} {index}\n")
    (dists / "Release").write_text(release)
    if signed:  # InRelease; else the older Release + Release.gpg
        key.gpg("--clearsign", "-o", str(dists / "InRelease"), str(dists / "Release"))
        (dists / "Release").unlink()
    else:
        key.gpg("--detach-sign", "--armor", "-o", str(dists / "Release.gpg"), str(dists / "Release"))
    return root


@pytest.fixture
def debs(tmp_path):
    return [make_deb(tmp_path, "hello", v) for v in ("2.10-2", "2.10-3~bpo1", "2.9-9", "1:0.1-1")] + \
        [make_deb(tmp_path, "other", "1.0")]


@pytest.mark.real  # gpg signs the archive, gpgv checks it
@pytest.mark.parametrize("kind", ["inrelease", "release-gz", "by-hash"])
def test_fetch_resolve_download(tmp_path, serve, debs, kind, signer, keyring):
    root = make_archive(tmp_path, debs, signer, signed=kind != "release-gz", gz=kind == "release-gz",
                        by_hash=kind == "by-hash")
    mirror = serve(root.parent)
    index = fetch_index(mirror, "bookworm", keyrings=keyring)
    assert sorted(p["Package"] for p in index) == ["hello"] * 4 + ["other"]
    entry = resolve(index, "hello")
    assert entry["Version"] == "1:0.1-1"
    assert resolve(index, "hello", "2.10-3~bpo1")["Filename"].endswith("hello_2.10-3~bpo1_xz.deb")
    dest = tmp_path / "out" / "hello.deb"
    assert download(mirror, entry, dest) == dest
    assert dest.read_bytes() == (root / entry["Filename"]).read_bytes()
    assert control_fields(dest)["Version"] == "1:0.1-1"
    assert [p.name for p in dest.parent.iterdir()] == ["hello.deb"]


def test_resolve_errors(debs, tmp_path):
    index = parse_stanzas("Package: hello\nVersion: 1.0\n\nPackage: help\nVersion: 2\n")
    with pytest.raises(DebError, match="no package 'helo'.*close names: hel"):
        resolve(index, "helo")
    with pytest.raises(DebError, match="no version 3.0"):
        resolve(index, "hello", "3.0")


@pytest.mark.real  # gpg signs the archive, gpgv checks it
def test_wrong_package_digest_is_rejected(tmp_path, serve, debs, signer, keyring):
    def corrupt(text):  # the first package's digest no longer matches its file
        return re.sub(r"SHA256: [0-9a-f]{64}", "SHA256: " + "e" * 64, text, count=1)

    root = make_archive(tmp_path, debs, signer, tamper=corrupt)
    mirror = serve(root.parent)
    entry = fetch_index(mirror, "bookworm", keyrings=keyring)[0]
    dest = tmp_path / "out" / "bad.deb"
    with pytest.raises(DebError, match="sha256"):
        download(mirror, entry, dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with pytest.raises(DebError, match="bytes"):
        download(mirror, dict(entry, Size=str(int(entry["Size"]) - 1)), dest)
    assert list(dest.parent.iterdir()) == []


@pytest.mark.real  # gpg signs the archive, gpgv checks it
def test_wrong_index_digest_is_rejected(tmp_path, serve, debs, signer, keyring):
    root = make_archive(tmp_path, debs, signer)
    (root / "dists/bookworm/main/binary-amd64/Packages.xz").write_bytes(lzma.compress(b"Package: evil\n"))
    with pytest.raises(DebError, match="the verified Release of suite bookworm on mirror http"):
        fetch_index(serve(root.parent), "bookworm", keyrings=keyring)


@pytest.mark.real  # gpg signs the archive, gpgv checks it
def test_missing_suite_and_missing_index(tmp_path, serve, debs, signer, keyring):
    root = make_archive(tmp_path, debs, signer)
    mirror = serve(root.parent)
    with pytest.raises(FileNotFoundError):
        fetch_index(mirror, "trixie", keyrings=keyring)
    with pytest.raises(DebError, match="lists no main/binary-arm64/Packages"):
        fetch_index(mirror, "bookworm", arch="arm64", keyrings=keyring)


@pytest.mark.real
def test_real_cloud_kernel_index():
    from conftest import require
    from forge.formats.debian.sources import debian_mirror, read_sources

    from forge.formats.debian.keyring import apt_keyrings

    mirror = debian_mirror(read_sources())
    require(mirror is not None, "no Debian mirror in the apt sources")
    index = fetch_index(mirror, "bookworm", keyrings=apt_keyrings(mirror, "bookworm", read_sources()))
    meta = resolve(index, "linux-image-cloud-amd64")
    names = [n for alts in depends(meta) for n in alts
             if re.fullmatch(r"linux-image-.+-cloud-amd64(-unsigned)?", n)]
    assert names, meta.get("Depends")
    kernel = resolve(index, names[0])
    assert kernel["Filename"].startswith("pool/main/l/linux") and kernel["Filename"].endswith(".deb")
    assert re.fullmatch(r"[0-9a-f]{64}", kernel["SHA256"]) and int(kernel["Size"]) > 10_000_000


@pytest.mark.real
@pytest.mark.parametrize("name, ext", [("pzstd", "zst"), ("zstd-two-frames", "zst"),
                                       ("gzip-cat", "gz"), ("pigz-cat", "gz")])
def test_deb_members_of_several_frames_or_members(tmp_path, name, ext):
    """A .deb whose data.tar was compressed by pzstd, or is concatenated gzip members
    (assembled by `ar` in dpkg-deb's member order): every file is there, and for gzip
    dpkg-deb agrees on the contents; a cut member is an error, not a short tree."""
    import shutil
    import subprocess
    import tarfile
    from compressed_streams import big_tar, compressed_by_tools
    from conftest import require
    require(shutil.which("ar") is not None, "ar is not installed (apt-get install binutils)")
    data = big_tar(files=24)
    blob = compressed_by_tools(data, tmp_path / "tools")[name]
    base = make_deb(tmp_path, "multi", "1", "zstd" if ext == "zst" else "gzip")
    work = tmp_path / "ar"
    work.mkdir()
    subprocess.run(["ar", "x", str(base)], cwd=work, check=True)
    (work / f"data.tar.{ext}").write_bytes(blob)
    deb = tmp_path / "multi.deb"
    subprocess.run(["ar", "rc", str(deb), "debian-binary", f"control.tar.{ext}", f"data.tar.{ext}"],
                   cwd=work, check=True)
    with open_data_tar(deb) as tf:
        names = [m.name for m in tf]
        assert names == [m.name for m in tarfile.open(fileobj=io.BytesIO(data))]
        assert tf.extractfile("d3/f023").read() == tarfile.open(
            fileobj=io.BytesIO(data)).extractfile("d3/f023").read()
    if ext == "gz":  # dpkg-deb 1.21 stops after the first zstd frame (and at a skippable one)
        listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                                 check=True).stdout
        assert listing == data
    assert control_fields(deb)["Package"] == "multi"
    (work / f"data.tar.{ext}").write_bytes(blob[:len(blob) * 2 // 3])
    cut = tmp_path / "cut.deb"
    subprocess.run(["ar", "rc", str(cut), "debian-binary", f"control.tar.{ext}", f"data.tar.{ext}"],
                   cwd=work, check=True)
    with pytest.raises(DebError, match="truncated"):
        open_data_tar(cut)
