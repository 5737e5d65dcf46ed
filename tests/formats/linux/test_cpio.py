"""Initramfs (cpio newc) writing checked with GNU cpio, gzip, zstd and a kernel-like reader."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
import time
import zlib
from pathlib import Path

import pytest

from conftest import require
from forge.formats.linux.cpio import (LINUXKIT_REPLACE, CpioWriter, compress, concatenate,
                                open_compressed, write_tree_from_tar)

MTIME = 1_492_533_000  # LinuxKit's fixed 2017-04-18 16:30 UTC
HAVE_CPIO = shutil.which("cpio") is not None


# ---- a reader that behaves like the kernel's unpacker -------------------------------

def parse_newc(data: bytes) -> list[list[dict]]:
    """Consecutive uncompressed archives, NULs between them skipped, as the kernel does."""
    archives, pos, current = [], 0, None
    while pos < len(data):
        if current is None:
            if data[pos] == 0:
                pos += 1
                continue
            assert pos % 4 == 0, f"archive at unaligned offset {pos}"
            current = []
        assert data[pos:pos + 6] == b"070701", (pos, data[pos:pos + 16])
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        e = dict(zip("ino mode uid gid nlink mtime size dmaj dmin rmaj rmin namesize check"
                     .split(), f))
        start = pos
        pos += 110
        e["name"] = data[pos:pos + e["namesize"] - 1].decode()
        assert data[pos + e["namesize"] - 1] == 0
        pos += e["namesize"]
        assert all(b == 0 for b in data[pos:pos + (-(pos - start) % 4)])
        pos += -(pos - start) % 4
        e["data"] = data[pos:pos + e["size"]]
        pos += e["size"] + (-e["size"] % 4)
        if e["name"] == "TRAILER!!!":
            archives.append(current)
            current = None
        else:
            current.append(e)
    assert current is None, "archive without trailer"
    return archives


def decompress_all(blob: bytes) -> bytes:
    """Every gzip member or plain cpio piece of an initrd, decompressed and joined."""
    out, pos = [], 0
    while pos < len(blob):
        if blob[pos] == 0:
            out.append(b"\0")
            pos += 1
        elif blob[pos:pos + 2] == b"\x1f\x8b":
            d = zlib.decompressobj(31)
            out.append(d.decompress(blob[pos:]))
            pos = len(blob) - len(d.unused_data)
        else:
            assert blob[pos:pos + 6] == b"070701"
            end = blob.index(b"TRAILER!!!\0", pos) + 11
            end += -(end - pos) % 4
            out.append(blob[pos:end])
            pos = end
    return b"".join(out)


def kernel_view(blob: bytes) -> dict[str, dict]:
    """The tree the kernel would end with: later entries replace earlier ones."""
    tree: dict[str, dict] = {}
    for archive in parse_newc(decompress_all(blob)):
        groups: dict[int, list[dict]] = {}  # hardlinks are only known within one archive
        for e in archive:
            tree[e["name"]] = e
            if e["nlink"] > 1 and not stat.S_ISDIR(e["mode"]):
                group = groups.setdefault(e["ino"], [])
                group.append(e)
                for other in group if e["size"] else ():
                    other["data"] = e["data"]
    return tree


def cpio(args: list[str], data: bytes, cwd: Path | None = None) -> str:
    r = subprocess.run(["cpio", *args], input=data, cwd=cwd, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode() + r.stderr.decode()


def listing(data: bytes) -> dict[str, str]:
    """name -> the `cpio -itv` line (ls -l style)."""
    out = cpio(["-itvn", "--quiet"], data)  # -n: numeric owners, not this host's names
    return {line.split()[-1] if " -> " not in line else line.split(" -> ")[0].split()[-1]:
            line for line in out.splitlines() if line.strip()}


# ---- a small tree of every kind -----------------------------------------------------

def small_tree(host_file: Path) -> bytes:
    buf = io.BytesIO()
    with CpioWriter(buf, mtime=MTIME) as w:
        w.add_dir("/etc")
        w.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        w.add_dir("bin", 0o755)
        w.add_file("bin/tool", host_file, mode=0o4755)
        w.add_file("bin/busybox", b"BUSYBOX" * 1000, mode=0o755, nlink=2)
        w.add_symlink("bin/sh", "busybox")
        w.add_dir("secret", 0o750, uid=1000, gid=1000)
        w.add_file("secret/key", b"k", mode=0o600, uid=1000, gid=1000)
        w.add_hardlink("bin/ash", "bin/busybox")
        w.add_dir("dev")
        w.add_device("dev/console", "c", 5, 1)
        w.add_device("dev/sda", "b", 8, 0, 0o660, gid=6)
        w.add_fifo("dev/initctl", 0o600)
    return buf.getvalue()


def test_header_layout_and_hardlink_data_last(tmp_path):
    (tmp_path / "tool").write_bytes(b"\x7fELF" + bytes(range(256)))
    [entries] = parse_newc(small_tree(tmp_path / "tool"))
    by = {e["name"]: e for e in entries}
    first, last = by["bin/busybox"], by["bin/ash"]
    assert first["ino"] == last["ino"] and first["nlink"] == last["nlink"] == 2
    assert first["size"] == 0 and last["data"] == b"BUSYBOX" * 1000
    assert all(e["mtime"] == MTIME for e in entries)
    assert by["bin/tool"]["mode"] == stat.S_IFREG | 0o4755
    assert by["bin/tool"]["data"] == (tmp_path / "tool").read_bytes()
    assert by["dev/console"]["mode"] == stat.S_IFCHR | 0o600
    assert (by["dev/console"]["rmaj"], by["dev/console"]["rmin"]) == (5, 1)
    assert by["bin/sh"]["data"] == b"busybox"
    inos = [e["ino"] for e in entries if e["name"] != "bin/ash"]
    assert inos == sorted(set(inos)) and inos[0] == 1  # counted up in write order
    assert not any(e["name"].startswith("/") or e["name"] == "." for e in entries)


def test_gnu_cpio_unpacks_every_kind(tmp_path):
    require(HAVE_CPIO, "GNU cpio is not installed (Debian package cpio)")
    (tmp_path / "tool").write_bytes(b"\x7fELF" + bytes(range(256)))
    data = small_tree(tmp_path / "tool")
    lines = listing(data)
    assert lines["dev/console"].startswith("crw-------")
    assert "5,   1" in lines["dev/console"] or "5, 1" in lines["dev/console"]
    assert lines["dev/sda"].startswith("brw-rw----")
    assert lines["dev/initctl"].startswith("prw-------")
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith("-> busybox")
    assert lines["bin/tool"].startswith("-rwsr-xr-x")
    assert lines["secret"].startswith("drwxr-x---") and " 1000 " in lines["secret"]
    if os.geteuid() != 0:  # unpacking devices and ownership needs root
        return
    root = tmp_path / "root"
    root.mkdir()
    cpio(["-idmv", "--no-absolute-filenames", "--quiet"], data, cwd=root)
    assert (root / "etc/passwd").read_text().startswith("root:x:0:0")
    assert (root / "bin/tool").read_bytes() == (tmp_path / "tool").read_bytes()
    assert stat.S_IMODE((root / "bin/tool").stat().st_mode) == 0o4755
    assert os.readlink(root / "bin/sh") == "busybox"
    a, b = (root / "bin/busybox").stat(), (root / "bin/ash").stat()
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert (root / "bin/ash").read_bytes() == b"BUSYBOX" * 1000
    console = (root / "dev/console").stat()
    assert stat.S_ISCHR(console.st_mode) and stat.S_IMODE(console.st_mode) == 0o600
    assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)
    assert stat.S_ISBLK((root / "dev/sda").stat().st_mode)
    assert stat.S_ISFIFO((root / "dev/initctl").stat().st_mode)
    s = (root / "secret").stat()
    assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (1000, 1000, 0o750)
    assert int((root / "etc/passwd").stat().st_mtime) == MTIME


def test_misuse_is_refused():
    w = CpioWriter(io.BytesIO(), mtime=0)
    w.add_file("a", b"x")
    with pytest.raises(ValueError, match="nlink"):
        w.add_hardlink("b", "a")
    with pytest.raises(ValueError, match=r"\.\."):
        w.add_file("../etc/passwd", b"")
    with pytest.raises(ValueError, match="32-bit"):
        w.add_file("big", b"", uid=2**32)
    w.add_file("c", b"y", nlink=3)
    w.add_hardlink("d", "c")
    with pytest.raises(ValueError, match="never written"):
        w.close()


def test_reproducible_bytes_and_gzip_header(tmp_path):
    (tmp_path / "tool").write_bytes(b"same")
    segs = []
    for i in range(2):
        out = tmp_path / f"seg{i}.gz"  # a real file name gzip could have recorded
        with open(out, "wb") as f, open_compressed(f, "gzip", 6) as z:
            z.write(small_tree(tmp_path / "tool"))
        segs.append(out.read_bytes())
    assert segs[0] == segs[1]
    head = segs[0]
    assert head[:3] == b"\x1f\x8b\x08"
    assert head[4:8] == b"\0\0\0\0", "gzip MTIME must be zero"
    assert not head[3] & 0x08, "gzip must carry no file name (FNAME)"
    assert gzip.decompress(head) == small_tree(tmp_path / "tool")


def test_zstd_round_trip():
    data = b"070701" + b"0" * 5000
    out = io.BytesIO()
    compress(io.BytesIO(data), out, "zstd", 3)
    blob = out.getvalue()
    assert blob[:4] == b"\x28\xb5\x2f\xfd"
    again = io.BytesIO()
    compress(io.BytesIO(data), again, "zstd", 3)
    assert again.getvalue() == blob
    require(shutil.which("zstd") is not None, "zstd is not installed (apt-get install zstd)")
    r = subprocess.run(["zstd", "-dc"], input=blob, capture_output=True, check=True)
    assert r.stdout == data


def segment(tmp_path: Path, name: str, files: dict[str, bytes], method="gzip") -> Path:
    raw = io.BytesIO()
    with CpioWriter(raw, mtime=MTIME) as w:
        w.add_dir("etc")
        for path, data in files.items():
            w.add_file(path, data)
    raw.seek(0)
    out = tmp_path / name
    with open(out, "wb") as f:
        compress(raw, f, method)
    return out


def test_concatenated_segments_override_in_order(tmp_path):
    s1 = segment(tmp_path, "one.gz", {"etc/motd": b"one\n", "etc/a": b"a"})
    s2 = segment(tmp_path, "two.gz", {"etc/motd": b"two\n", "etc/b": b"b"})
    s3 = segment(tmp_path, "three.cpio", {"etc/c": b"c"}, method="none")
    initrd = tmp_path / "initrd.img"
    with open(initrd, "wb") as f:
        concatenate([s1, s2, s3], f)
    blob = initrd.read_bytes()
    tree = kernel_view(blob)
    assert tree["etc/motd"]["data"] == b"two\n"
    assert {tree[n]["data"] for n in ("etc/a", "etc/b", "etc/c")} == {b"a", b"b", b"c"}
    # the plain segment had to be realigned to 4 bytes after the gzip ones
    assert len(blob) % 4 == 0 and len(blob) >= s1.stat().st_size + s2.stat().st_size
    if HAVE_CPIO:  # GNU cpio reads one archive: check each segment on its own
        for seg, names in ((s1, {"etc", "etc/motd", "etc/a"}),
                           (s2, {"etc", "etc/motd", "etc/b"})):
            root = tmp_path / seg.stem
            root.mkdir()
            cpio(["-idm", "--quiet"], gzip.decompress(seg.read_bytes()), cwd=root)
            assert {str(p.relative_to(root)) for p in root.rglob("*")} == names
        assert (tmp_path / "two/etc/motd").read_text() == "two\n"


# ---- an exported image filesystem -----------------------------------------------------

def image_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, kind="f", data=b"", mode=0o644, uid=0, gid=0, link=""):
            t = tarfile.TarInfo(name)
            t.mode, t.uid, t.gid, t.mtime, t.uname = mode, uid, gid, 1_700_000_000, "someone"
            t.type = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
                      "h": tarfile.LNKTYPE, "c": tarfile.CHRTYPE}[kind]
            t.linkname = link
            if kind == "c":
                t.devmajor, t.devminor = 1, 3
            t.size = len(data) if kind == "f" else 0
            tf.addfile(t, io.BytesIO(data) if kind == "f" else None)
        add(".dockerenv")
        add("Dockerfile", data=b"FROM scratch\n")
        add("bin", "d", mode=0o755)
        add("bin/app", data=b"APP" * 100, mode=0o755)
        add("bin/app2", "h", link="bin/app")
        add("dev", "d", mode=0o755)
        add("dev/console", mode=0o755)  # a regular file in `docker export` output
        add("dev/null", "c", mode=0o666)
        add("dev/pts", "d")
        add("dev/pts/0", "c")
        add("etc", "d")
        add("etc/hostname", data=b"abc123\n")
        add("etc/hosts", data=b"")
        add("etc/resolv.conf", "l", link="../run/resolv.conf")
        add("home/user/notes", data=b"mine", mode=0o750, uid=1000, gid=1000)  # no parent dirs
        add("tmp", "d", mode=0o1777)
    return buf.getvalue()


def test_image_tar_becomes_a_bootable_tree():
    out = io.BytesIO()
    write_tree_from_tar(io.BytesIO(gzip.compress(image_tar())), out, mtime=MTIME,
                        replace=LINUXKIT_REPLACE)
    [entries] = parse_newc(out.getvalue())
    names = [e["name"] for e in entries]
    by = {e["name"]: e for e in entries}
    for gone in (".dockerenv", "Dockerfile", "dev/pts", "dev/pts/0", "etc/hostname"):
        assert gone not in names
    assert names[:2] == ["proc", "sys"], "missing mount points come first"
    assert {"proc", "sys", "run"} <= set(names) and names.count("tmp") == 1
    assert names.index("dev/console") == names.index("dev") + 1
    console = by["dev/console"]
    assert console["mode"] == stat.S_IFCHR | 0o600
    assert (console["rmaj"], console["rmin"]) == (5, 1)
    assert by["dev/null"]["mode"] == stat.S_IFCHR | 0o666 and by["dev/null"]["rmin"] == 3
    assert by["etc/hosts"]["data"] == LINUXKIT_REPLACE["etc/hosts"]
    assert by["etc/resolv.conf"]["mode"] == stat.S_IFREG | 0o644
    assert by["etc/resolv.conf"]["data"] == LINUXKIT_REPLACE["etc/resolv.conf"]
    notes = by["home/user/notes"]
    assert (notes["uid"], notes["gid"], notes["mode"]) == (1000, 1000, stat.S_IFREG | 0o750)
    assert names.index("home") < names.index("home/user") < names.index("home/user/notes")
    app, app2 = by["bin/app"], by["bin/app2"]
    assert app["ino"] == app2["ino"] and app["size"] == 0 and app2["data"] == b"APP" * 100
    assert by["tmp"]["mode"] == stat.S_IFDIR | 0o1777
    assert all(e["mtime"] == MTIME for e in entries)
    again = io.BytesIO()
    write_tree_from_tar(io.BytesIO(image_tar()), again, mtime=MTIME, replace=LINUXKIT_REPLACE)
    assert again.getvalue() == out.getvalue()
    if HAVE_CPIO:
        lines = listing(out.getvalue())
        assert lines["dev/console"].startswith("crw-------")
        assert lines["home/user/notes"].startswith("-rwxr-x---")
        assert lines["home/user/notes"].split()[2:4] == ["1000", "1000"]
        assert "etc/hostname" not in lines and ".dockerenv" not in lines


class Pipe(io.RawIOBase):
    """A stream that cannot seek, like `docker export` output."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._data.read(min(len(b), 777))
        b[:len(chunk)] = chunk
        return len(chunk)


def test_console_and_mount_points_can_be_left_out():
    out = io.BytesIO()
    write_tree_from_tar(Pipe(image_tar()), out, mtime=0, console=False, extra_dirs=(),
                        drop=())
    names = {e["name"] for e in parse_newc(out.getvalue())[0]}
    assert "proc" not in names and ".dockerenv" in names
    assert stat.S_ISREG(next(e for e in parse_newc(out.getvalue())[0]
                             if e["name"] == "dev/console")["mode"])


# ---- speed, reported only -------------------------------------------------------------

def test_speed_against_gnu_cpio_and_gzip(tmp_path):
    require(HAVE_CPIO and shutil.which("gzip") is not None, "GNU cpio or gzip missing")
    tree = tmp_path / "tree"
    rnd = os.urandom(1 << 20)
    text = b"".join(b"line %d of some fairly ordinary configuration text\n" % i
                    for i in range(20000))
    total = 0
    for i in range(4):  # large files: half text, half incompressible
        blob = (text * 13)[:10 << 20] + rnd * 10
        (tree / "big").mkdir(parents=True, exist_ok=True)
        (tree / f"big/file{i}").write_bytes(blob)
        total += len(blob)
    for i in range(5000):  # small files, 4 KiB each
        d = tree / "small" / f"d{i // 100}"
        d.mkdir(parents=True, exist_ok=True)
        blob = text[i * 7: i * 7 + 2048] + rnd[i * 8: i * 8 + 2048]
        (d / f"f{i}").write_bytes(blob)
        total += len(blob)

    t0 = time.perf_counter()
    with open(tmp_path / "forge.gz", "wb") as f, open_compressed(f, "gzip", 6) as z:
        with CpioWriter(z, mtime=MTIME) as w:
            for dirpath, dirnames, filenames in os.walk(tree):
                dirnames.sort()
                rel = os.path.relpath(dirpath, tree)
                if rel != ".":
                    w.add_dir(rel)
                for n in sorted(filenames):
                    w.add_file(os.path.join(rel, n), os.path.join(dirpath, n))
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run("find . | cpio -o -H newc --quiet | gzip -6 > ../gnu.gz", shell=True,
                   cwd=tree, check=True)
    theirs = time.perf_counter() - t0
    mb = total / 1e6
    size = {n: (tmp_path / n).stat().st_size / 1e6 for n in ("forge.gz", "gnu.gz")}
    print(f"\n[cpio speed] {mb:.0f} MB in 5004 files, gzip -6: forge {mb / ours:.0f} MB/s "
          f"({ours:.2f} s, {size['forge.gz']:.1f} MB); find | cpio -o -H newc | gzip -6 "
          f"{mb / theirs:.0f} MB/s ({theirs:.2f} s, {size['gnu.gz']:.1f} MB)")
    tree_view = kernel_view((tmp_path / "forge.gz").read_bytes())
    assert tree_view["big/file0"]["size"] == 20 << 20


@pytest.mark.real
@pytest.mark.parametrize("name", ["zstd-two-frames", "pzstd", "zstd-T2-long", "gzip-cat",
                                  "pigz-cat"])
def test_a_layer_tar_of_several_members_or_frames_becomes_one_segment(tmp_path, name):
    """The tars an initrd is made of may come as image layers compressed by any tool:
    every member is read, so the segment holds every file, the last one included."""
    from compressed_streams import big_tar, compressed_by_tools
    data = big_tar(files=24)
    blob = compressed_by_tools(data, tmp_path / "tools")[name]
    segs = []
    for src in (io.BytesIO(blob), Pipe(blob)):
        out = io.BytesIO()
        write_tree_from_tar(src, out, mtime=MTIME, console=False, extra_dirs=())
        segs.append(out.getvalue())
    assert segs[0] == segs[1]
    plain = io.BytesIO()
    write_tree_from_tar(io.BytesIO(data), plain, mtime=MTIME, console=False, extra_dirs=())
    assert segs[0] == plain.getvalue()
    require(shutil.which("cpio") is not None, "cpio is not installed (apt-get install cpio)")
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=segs[0], capture_output=True,
                             check=True).stdout.decode().split()
    assert "d3/f023" in listing and len([n for n in listing if "/f" in n]) == 24
