"""Root images (kernel+squashfs, kernel+erofs, kernel+iso): built from small fragments and
read back with the real tools (unsquashfs, dump.erofs/fsck.erofs, xorriso) for ownership,
modes, symlinks, hardlinks and device nodes; byte-identical across paths and umasks; the
boot initrd's content; the formats in linuxkit_image. Each format boots RedisOS to PONG in
tests/test_redisos.py (BOOTED)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from boot_fixture import BUSYBOX, cloud_kernel  # noqa: F401 (fixture)
from conftest import require
from forge.formats.debian.package import open_data_tar
from forge.formats.disk import rootfs
from forge.formats.disk.errors import DiskImageError
from forge.formats.linux import bootinitrd
from forge.formats.linux.errors import BootInitrdError
from forge.formats.vm import machine as qemu

EPOCH = 1700000000


def _tar(path: Path, entries: list[tuple]) -> Path:
    """entries: (name, kind, mode, uid, extra) with kind f(ile: extra=data), d, l(symlink:
    extra=target), h(ardlink: extra=target), c(har device: extra=(major, minor))."""
    kinds = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
             "h": tarfile.LNKTYPE, "c": tarfile.CHRTYPE}
    with tarfile.open(path, "w") as tf:
        for name, kind, mode, uid, extra in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kinds[kind], mode, uid, uid, 12345
            data = None
            if kind == "f":
                data = extra
                ti.size = len(data)
            elif kind in "lh":
                ti.linkname = extra
            elif kind == "c":
                ti.devmajor, ti.devminor = extra
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def _fragments(d: Path) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    a = _tar(d / "a.tar", [
        ("etc", "d", 0o755, 0, None),
        ("etc/motd", "f", 0o644, 0, b"first\n"),
        ("opt/gone", "d", 0o755, 0, None),
        ("opt/gone/inside", "f", 0o644, 0, b"x"),
        ("bin/tool", "f", 0o4755, 0, b"#!/bin/sh\n"),
        ("bin/tool2", "h", 0o4755, 0, "bin/tool"),
        ("bin/old", "f", 0o755, 0, b"old\n"),
        ("bin/old2", "h", 0o755, 0, "bin/old"),
        ("etc/shadow", "f", 0o000, 0, b"secret\n"),  # unreadable to a user without root
    ])
    unpacked = d / "unpacked"  # an LkUnpack output: a directory holding rootfs.tar
    unpacked.mkdir(exist_ok=True)
    _tar(unpacked / "rootfs.tar", [
        ("containers/services/redis/lower/data", "d", 0o700, 100, None),
        ("containers/services/redis/lower/data/db", "f", 0o600, 100, b"redis"),
        ("containers/services/redis/lower/bin/sh", "l", 0o777, 101, "busybox"),
        ("dev/null", "c", 0o666, 0, (1, 3)),
    ])
    b = _tar(d / "b.tar", [
        ("etc", "d", 0o750, 7, None),            # a later directory's metadata wins
        ("etc/motd", "f", 0o640, 5, b"second\n"),  # a later file replaces an earlier one
        ("opt/gone", "f", 0o644, 0, b"now a file\n"),  # and a directory with its contents
        ("bin/old", "f", 0o700, 0, b"new\n"),  # its hardlink keeps the old file
    ])
    return [a, unpacked, b]


def _have(fmt: str) -> None:
    try:
        rootfs.tools(fmt)
    except DiskImageError as e:
        require(False, str(e))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rootimg")
    frags = _fragments(root / "frags")
    out = {}
    for fmt in rootfs.FORMATS:
        _have(fmt)
        out[fmt] = rootfs.build(fmt, fragments=frags, name="demo", out=root / f"{fmt}.img",
                                workdir=root / f"work-{fmt}", epoch=EPOCH)
    return out


EXPECTED = {  # path -> (mode string, uid/gid, extra)
    "bin/tool": ("-rwsr-xr-x", "0/0", ""),
    "bin/tool2": ("-rwsr-xr-x", "0/0", ""),
    "containers/services/redis/lower/bin/sh": ("lrwxrwxrwx", "101/101", "busybox"),
    "containers/services/redis/lower/data": ("drwx------", "100/100", ""),
    "containers/services/redis/lower/data/db": ("-rw-------", "100/100", ""),
    "dev/console": ("crw-------", "0/0", "5,1"),
    "dev/null": ("crw-rw-rw-", "0/0", "1,3"),
    "etc": ("drwxr-x---", "7/7", ""),
    "etc/motd": ("-rw-r-----", "5/5", ""),
    "etc/shadow": ("----------", "0/0", ""),
    "opt/gone": ("-rw-r--r--", "0/0", ""),
    "tmp": ("drwxrwxrwt", "0/0", ""),
}


def _check(listing: dict[str, tuple]) -> None:
    for path, want in EXPECTED.items():
        assert listing.get(path) == want, (path, listing.get(path))
    assert "opt/gone/inside" not in listing


@pytest.mark.real
def test_squashfs_holds_the_merged_tree(images):
    out = subprocess.run(["unsquashfs", "-lln", "-d", "", images["kernel+squashfs"]],
                         capture_output=True, text=True, check=True).stdout
    listing = {}
    for line in out.splitlines():
        m = re.match(r"(\S+) (\d+/\d+)\s+(\d+|\s*\d+,\s*\d+) \S+ \S+ /?(\S*)(?: -> (\S+))?$", line)
        if m:
            extra = m.group(5) or (m.group(3).replace(" ", "") if "," in m.group(3) else "")
            listing[m.group(4)] = (m.group(1), m.group(2), extra)
    _check(listing)
    def cat(path):
        return subprocess.run(["unsquashfs", "-cat", images["kernel+squashfs"], path],
                              capture_output=True, check=True).stdout
    assert (cat("bin/old"), cat("bin/old2"), cat("etc/motd"), cat("etc/shadow")) == (
        b"new\n", b"old\n", b"second\n", b"secret\n")
    assert listing["bin/old"][0] == "-rwx------"
    # the superblock's time is the epoch
    assert subprocess.run(["unsquashfs", "-s", images["kernel+squashfs"]], capture_output=True,
                          text=True, check=True).stdout.count("Nov 14 22:13:20 2023") == 1


@pytest.mark.real
def test_erofs_holds_the_merged_tree(images, tmp_path):
    img = images["kernel+erofs"]
    # fsck.erofs extracts as root would: run it under fakeroot and read back with ls -ln
    dest = tmp_path / "x"
    state = tmp_path / "state"
    subprocess.run(["fakeroot", "-s", state, "--", "fsck.erofs", f"--extract={dest}", img],
                   check=True, capture_output=True)
    ls = subprocess.run(["fakeroot", "-i", state, "--", "find", dest, "-printf",
                         r"%M %U/%G %P %l\n"], capture_output=True, text=True, check=True).stdout
    listing = {}
    for line in ls.splitlines():
        mode, ids, path, *link = line.split(" ")
        listing[path] = (mode, ids, link[0] if link and link[0] else "")
    devs = subprocess.run(["fakeroot", "-i", state, "--", "stat", "-c", "%n %t,%T",
                           dest / "dev/console", dest / "dev/null"], capture_output=True,
                          text=True, check=True).stdout.split()
    listing["dev/console"] = (listing["dev/console"][0], listing["dev/console"][1], "5,1") \
        if devs[1] == "5,1" else listing["dev/console"]
    listing["dev/null"] = (listing["dev/null"][0], listing["dev/null"][1], "1,3") \
        if devs[3] == "1,3" else listing["dev/null"]
    # erofs-utils 1.5 extracts and shows modes without the setuid bit: read i_mode from
    # the inode dump.erofs locates (NID; i_mode is at byte 4 of an inode), as the kernel does
    raw = img.read_bytes()
    meta = int.from_bytes(raw[1024 + 40:1024 + 44], "little") * 4096
    nids = set()
    for p in ("bin/tool", "bin/tool2"):
        stat = subprocess.run(["dump.erofs", f"--path=/{p}", img], capture_output=True,
                              text=True, check=True).stdout
        nid = int(re.search(r"NID: (\d+)", stat).group(1))
        nids.add(nid)
        mode = int.from_bytes(raw[meta + nid * 32 + 4:meta + nid * 32 + 6], "little")
        assert mode == 0o104755, oct(mode)
        listing[p] = ("-rwsr-xr-x", listing[p][1], "")
    assert len(nids) == 1  # the hardlink is one inode
    _check(listing)
    head = subprocess.run(["dump.erofs", img], capture_output=True, text=True, check=True).stdout
    assert str(rootfs.volume_uuid("demo", "kernel+erofs")) in head, head


@pytest.mark.real
def test_iso_has_rock_ridge_ownership_and_devices(images):
    out = subprocess.run(["xorriso", "-indev", images["kernel+iso"], "-find", "/", "-exec",
                          "lsdl"], capture_output=True, text=True, check=True).stdout
    listing = {}
    for line in out.splitlines():
        m = re.match(r"(\S+)\s+\d+\s+(\d+)\s+(\d+)\s+(\S+)\s+\w+\s+\d+\s+\d+\s+'/([^']*)'"
                     r"(?: -> '([^']*)')?", line)
        if m:
            extra = m.group(6) or (m.group(4) if "," in m.group(4) else "")
            listing[m.group(5)] = (m.group(1), f"{m.group(2)}/{m.group(3)}", extra)
    _check(listing)


@pytest.mark.real
def test_byte_identical_across_paths_and_umasks(tmp_path):
    sums = []
    for i, umask in enumerate((0o022, 0o077)):
        root = tmp_path / f"ws{i}" / ("deep/er" if i else "")
        frags = _fragments(root / "frags")
        old = os.umask(umask)
        try:
            for fmt in rootfs.FORMATS:
                _have(fmt)
                rootfs.build(fmt, fragments=frags, name="demo", out=root / f"{fmt}.img",
                             workdir=root / f"work-{fmt}", epoch=EPOCH)
        finally:
            os.umask(old)
        sums.append({f: (root / f"{f}.img").read_bytes() for f in rootfs.FORMATS})
    for fmt in rootfs.FORMATS:
        assert sums[0][fmt] == sums[1][fmt], fmt


@pytest.mark.real
def test_a_build_without_root_gives_the_same_bytes(images):
    """CI runs as root: build again as nobody, in a forked child, a file of mode 0000
    included (its parents and the venv may be root's alone, hence a directory in /tmp)."""
    require(os.getuid() == 0, "needs root to build as another user")
    for fmt in rootfs.FORMATS:
        _have(fmt)
    root = Path(tempfile.mkdtemp(prefix="forge-nobody-"))
    try:
        _fragments(root / "frags")
        for p in [root, *root.rglob("*")]:
            os.chown(p, 65534, 65534, follow_symlinks=False)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                os.environ["HOME"] = str(root)
                frags = [root / "frags/a.tar", root / "frags/unpacked", root / "frags/b.tar"]
                for fmt in rootfs.FORMATS:
                    rootfs.build(fmt, fragments=frags, name="demo", out=root / f"{fmt}.img",
                                 workdir=root / f"work-{fmt}", epoch=EPOCH)
                code = 0
            except BaseException as e:
                (root / "error").write_text(str(e))
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, (root / "error").read_text()
        for fmt, path in images.items():
            assert (root / f"{fmt}.img").read_bytes() == path.read_bytes(), fmt
    finally:
        shutil.rmtree(root)


def test_unknown_format_and_bad_members(tmp_path):
    with pytest.raises(DiskImageError, match="unknown root image format 'kernel\\+ext4'"):
        rootfs.tools("kernel+ext4")
    bad = _tar(tmp_path / "bad.tar", [("../etc/passwd", "f", 0o644, 0, b"")])
    with pytest.raises(DiskImageError, match="leaves the root"):
        rootfs.merge_fragments([bad], tmp_path / "out.tar", epoch=0)


@pytest.mark.real
def test_a_missing_tool_names_its_debian_package(monkeypatch, tmp_path):
    for tool in ("fakeroot", "tar"):  # a host with these two and nothing else
        where = shutil.which(tool)
        require(where is not None, f"{tool} is not installed")
        (tmp_path / tool).symlink_to(where)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("forge.formats.disk.tools._SEARCH", ())
    for fmt, package in (("kernel+squashfs", "squashfs-tools"), ("kernel+erofs", "erofs-utils"),
                         ("kernel+iso", "xorriso")):
        with pytest.raises(DiskImageError, match=f"install the Debian package {package}$"):
            rootfs.tools(fmt)
    (tmp_path / "fakeroot").unlink()
    with pytest.raises(DiskImageError, match="install the Debian package fakeroot$"):
        rootfs.tools("kernel+iso")


def test_the_boot_initrd_needs_a_static_busybox(tmp_path):
    dyn = _tar(tmp_path / "dyn.tar", [("bin/busybox", "f", 0o755, 0, Path("/bin/true").read_bytes())])
    with pytest.raises(BootInitrdError, match="dynamically linked"):
        bootinitrd.find_busybox([dyn])
    none = _tar(tmp_path / "none.tar", [("etc/motd", "f", 0o644, 0, b"")])
    with pytest.raises(BootInitrdError, match="has no bin/busybox"):
        bootinitrd.find_busybox([none])


def _kernel_tar(kernel, dest: Path) -> Path:
    """The kernel package's modules as a kernel target's kernel.tar holds them."""
    with open_data_tar(kernel.deb) as src, tarfile.open(dest, "w") as out:
        for m in src:
            if m.isfile() and ".ko" in m.name:
                out.addfile(m, src.extractfile(m))
    return dest


@pytest.fixture(scope="module")
def kernel_tar(cloud_kernel, tmp_path_factory):  # noqa: F811
    return _kernel_tar(cloud_kernel, tmp_path_factory.mktemp("ktar") / "kernel.tar")


@pytest.mark.real
def test_boot_initrd_loads_the_modules_in_order(kernel_tar, tmp_path):
    require(BUSYBOX.is_file(), "busybox-static is not installed")
    out = tmp_path / "boot.img"
    loaded = bootinitrd.build(out, kernel_tar=kernel_tar, busybox=BUSYBOX.read_bytes(), epoch=EPOCH)
    assert set(bootinitrd.MODULES) <= set(loaded)
    assert loaded.index("virtio") < loaded.index("virtio_pci") < loaded.index("virtio_blk")
    listing = subprocess.run(["cpio", "-itv"], input=out.read_bytes(), capture_output=True,
                             check=True).stdout.decode()
    assert re.search(r"^crw------- .* 5,\s+1 .* dev/console$", listing, re.M), listing
    assert re.search(r"^-rwxr-xr-x .* init$", listing, re.M)


# ---- in linuxkit_image: planned on the shared fragments -----------------------------------

@pytest.fixture
def lk(tmp_path):
    from test_linuxkit import make_workspace
    require(BUSYBOX.is_file(), "busybox-static is not installed")
    for fmt in rootfs.FORMATS:
        _have(fmt)
    return make_workspace(tmp_path / "ws", tmp_path / "cache")


def _executed(r) -> list[tuple[str, str]]:
    return sorted((e["mnemonic"], Path(e["outputs"][0]).name) for e in r.event_list
                  if e.get("status") == "executed")


@pytest.mark.real
def test_each_format_is_one_action_on_the_shared_fragments(lk):
    build = (lk.root / "BUILD").read_text()
    (lk.root / "BUILD").write_text(build.replace('["kernel+initrd", "tar"]',
                                                 '["kernel+initrd", "kernel+squashfs"]'))
    r = lk.build("//:os")
    assert r.code == 0, r.err
    out = lk.root / "forge-out"
    assert {p.name for p in out.iterdir() if p.is_file()} >= {
        "os-kernel", "os-cmdline", "os-squashfs.img", "os-boot-initrd.img", "os-initrd.img"}
    listing = subprocess.run(["unsquashfs", "-lln", "-d", "", out / "os-squashfs.img"],
                             capture_output=True, text=True, check=True).stdout
    for want in (r"^drwx------ 101/0 .* /run/web$", r"^crw------- 0/0\s+5,\s+1 .* /dev/console$",
                 r"^-rw-r--r-- 0/0 .* /containers/services/web/lower/srv/hello\.txt$",
                 r"^-rwxr-xr-x 0/0 .* /bin/busybox$", r"^-rw-r--r-- 0/0 .* /etc/motd$"):
        assert re.search(want, listing, re.M), (want, listing)
    # adding a format runs its action alone: the fragments and the boot initrd are shared
    (lk.root / "BUILD").write_text(build.replace(
        '["kernel+initrd", "tar"]', '["kernel+initrd", "kernel+squashfs", "kernel+erofs"]'))
    r = lk.build("//:os")
    assert r.code == 0, r.err
    assert _executed(r) == [("LkRootImage", "os-erofs.img")]
    # kernel+iso writes N.iso, as iso-bios does (LinuxKit's names): an error, not a clash
    (lk.root / "BUILD").write_text(build.replace('["kernel+initrd", "tar"]',
                                                 '["iso-bios", "kernel+iso"]'))
    r = lk.build("//:os")
    assert r.code == 2  # an analysis error, found before anything runs
    assert "BUILD:5:5: error: formats iso-bios and kernel+iso both write os.iso" in r.err, r.err


def test_boot_spec_boots_the_kernel_with_the_image_as_a_read_only_disk(tmp_path):
    from rules.qemu import BOOTABLE, boot_spec
    names = [t.format(name="n") for t in rootfs.FORMATS["kernel+erofs"]]
    (tmp_path / "n-cmdline").write_text("console=ttyS0")
    spec = boot_spec("kernel+erofs", [tmp_path / n for n in names])
    argv = qemu.qemu_argv(spec, accel="tcg")
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "n-kernel")
    assert argv[argv.index("-initrd") + 1] == str(tmp_path / "n-boot-initrd.img")
    assert argv[argv.index("-append") + 1] == "console=ttyS0"
    assert f"file={tmp_path / 'n-erofs.img'},format=raw,if=virtio,readonly=on" in argv
    assert set(rootfs.FORMATS) <= set(BOOTABLE)
