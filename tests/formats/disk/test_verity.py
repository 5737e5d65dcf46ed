"""dm-verity for the root images (forge.formats.disk.verity), with Debian's veritysetup on
plain files; the boot initrd's dmsetup and its libraries (forge.formats.linux.elf); and a
real boot under QEMU of a tiny verified erofs root, whole and with one byte changed."""

from __future__ import annotations

import io
import random
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from boot_fixture import BUSYBOX, cloud_kernel  # noqa: F401 (fixture)
from conftest import require
from forge.formats.debian.package import open_data_tar
from forge.formats.disk import rootfs, verity
from forge.formats.disk.errors import DiskImageError
from forge.formats.linux import bootinitrd, elf
from forge.formats.linux.errors import BootInitrdError

EPOCH = 1700000000
LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64")


def _need_veritysetup() -> None:
    require(shutil.which("veritysetup", path="/usr/sbin:/sbin:/usr/bin") is not None,
            "veritysetup is not installed (Debian package cryptsetup-bin)")


def _image(path: Path, size: int, seed: int = 1) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def _verify(image: Path, v: verity.Verity) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("veritysetup", path="/usr/sbin:/sbin"), "verify",
                           f"--hash-offset={v.data_blocks * verity.BLOCK}", image, image,
                           v.root_hash], capture_output=True, text=True)


@pytest.mark.real
def test_the_tree_is_appended_and_veritysetup_verifies_it(tmp_path):
    _need_veritysetup()
    img = _image(tmp_path / "root.img", 3 * 4096 + 100)
    original = img.read_bytes()
    v = verity.append_hash_tree(img, workdir=tmp_path)
    assert v.data_blocks == 4  # padded to whole blocks with zeros
    data = img.read_bytes()
    assert data[:len(original)] == original and data[len(original):4 * 4096] == bytes(4 * 4096 - len(original))
    assert data[4 * 4096:4 * 4096 + 8] == b"verity\0\0"  # the superblock right after the data
    assert re.fullmatch(r"[0-9a-f]{64}", v.root_hash) and re.fullmatch(r"[0-9a-f]{64}", v.salt)
    r = _verify(img, v)
    assert r.returncode == 0, r.stderr
    # one byte of the data changed: the tree no longer matches
    with open(img, "r+b") as f:
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 1]))
    r = _verify(img, v)
    assert r.returncode != 0 and "failed at position 4096" in r.stderr, r.stdout + r.stderr


@pytest.mark.real
def test_same_image_same_bytes_anywhere(tmp_path):
    _need_veritysetup()
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deep").mkdir(parents=True)
    a = _image(tmp_path / "a" / "x.img", 50000)
    b = _image(tmp_path / "b" / "deep" / "y.img", 50000)
    va = verity.append_hash_tree(a, workdir=tmp_path / "a")
    vb = verity.append_hash_tree(b, workdir=tmp_path / "b")
    assert va == vb and a.read_bytes() == b.read_bytes()
    other = verity.append_hash_tree(_image(tmp_path / "c.img", 50000, seed=2), workdir=tmp_path)
    assert other.root_hash != va.root_hash and other.salt != va.salt


def test_table_and_command_line():
    v = verity.Verity(11110, "ab" * 32, "cd" * 32)
    assert v.table() == (f"0 88880 verity 1 /dev/vda /dev/vda 4096 4096 11110 11111 sha256 "
                         f"{'ab' * 32} {'cd' * 32}")
    line = verity.with_verity("console=ttyS0 root=/dev/sda panic=1", v)
    assert line == f'console=ttyS0 panic=1 dm-mod.create="vroot,,,ro,{v.table()}" root=/dev/dm-0'
    assert verity.Verity.from_json(v.to_json()) == v
    with pytest.raises(DiskImageError, match="dm-mod.create"):
        verity.with_verity('dm-mod.create="x,,,ro,0 1 zero"', v)
    with pytest.raises(DiskImageError, match="cannot go in a device-mapper table"):
        verity.Verity(1, 'ab" init=/bin/sh', "cd").table()
    with pytest.raises(DiskImageError, match="not a verity description"):
        verity.Verity.from_json({"root_hash": "ab"})


def test_an_empty_image_and_a_missing_tool(tmp_path, monkeypatch):
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(DiskImageError, match="is empty"):
        verity.append_hash_tree(empty, workdir=tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("forge.formats.disk.tools._SEARCH", ())
    with pytest.raises(DiskImageError, match="install the Debian package cryptsetup-bin"):
        verity.tools()


# ---- dmsetup in the boot initrd ---------------------------------------------------------

def _host_lib(soname: str) -> bytes | None:
    for d in LIB_DIRS:
        p = Path(d) / soname
        if p.is_file():
            return p.read_bytes()
    return None


def _dmsetup() -> bytes:
    found = shutil.which("dmsetup", path="/usr/sbin:/sbin")
    require(found is not None, "dmsetup is not installed (Debian package dmsetup)")
    return Path(found).read_bytes()


def test_elf_needs_match_readelf():
    dmsetup = _dmsetup()
    require(shutil.which("readelf") is not None, "readelf is not installed (binutils)")
    out = subprocess.run(["readelf", "-d", shutil.which("dmsetup", path="/usr/sbin:/sbin")],
                         capture_output=True, text=True, check=True).stdout
    assert elf.needed(dmsetup) == re.findall(r"\(NEEDED\)\s+Shared library: \[(.+)\]", out)
    assert elf.interpreter(dmsetup) == "/lib64/ld-linux-x86-64.so.2"
    libs = elf.closure(dmsetup, _host_lib, "dmsetup")
    assert {"libdevmapper.so.1.02.1", "libc.so.6", "ld-linux-x86-64.so.2"} <= set(libs)
    if BUSYBOX.is_file():  # static: no loader, no libraries
        assert elf.interpreter(BUSYBOX.read_bytes()) is None and elf.needed(BUSYBOX.read_bytes()) == []
    with pytest.raises(BootInitrdError, match="needs libdevmapper.so.1.02.1, which none"):
        elf.closure(dmsetup, lambda n: None if n.startswith("libdevmapper") else _host_lib(n), "dmsetup")
    with pytest.raises(BootInitrdError, match="not an ELF file"):
        elf.needed(b"#!/bin/sh\n" + bytes(64))


def _modules_tar(kernel, dest: Path) -> Path:
    with open_data_tar(kernel.deb) as src, tarfile.open(dest, "w") as out:
        for m in src:
            if m.isfile() and ".ko" in m.name:
                out.addfile(m, src.extractfile(m))
    return dest


def _root(tmp_path: Path, init: str) -> Path:
    """A tiny erofs root: the static busybox and `init`, with its hash tree."""
    frag = tmp_path / "root.tar"
    with tarfile.open(frag, "w") as tf:
        for name, data in (("bin/busybox", BUSYBOX.read_bytes()), ("init", init.encode())):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o755
            tf.addfile(ti, io.BytesIO(data))
    img = rootfs.build("kernel+erofs", fragments=[frag], name="v", out=tmp_path / "v-erofs.img",
                       workdir=tmp_path / "work", epoch=EPOCH)
    return img


def _first_block_of(image: Path, path: str) -> int:
    """The byte offset of `path`'s first data block in an uncompressed erofs image."""
    out = subprocess.run(["dump.erofs", f"--path={path}", "-e", image], capture_output=True,
                         text=True, check=True).stdout
    return int(re.search(r"^\s*0:\s*0\.\.\s*\d+\s*\|\s*\d+\s*:\s*(\d+)\.\.", out, re.M).group(1))


@pytest.mark.real
@pytest.mark.slow
def test_a_verified_root_boots_and_a_changed_block_is_refused(cloud_kernel, tmp_path):  # noqa: F811
    from forge.formats.vm import machine as qemu
    from forge.formats.vm.errors import VMExited
    from forge.formats.vm.probe import console_regex
    _need_veritysetup()
    require(BUSYBOX.is_file(), "busybox-static is not installed")
    require(shutil.which(qemu.QEMU) is not None, "qemu-system-x86_64 missing (qemu-system-x86)")
    require(shutil.which("dump.erofs") is not None, "dump.erofs missing (erofs-utils)")
    boot = tmp_path / "boot.img"
    loaded = bootinitrd.build(boot, kernel_tar=_modules_tar(cloud_kernel, tmp_path / "k.tar"),
                              busybox=BUSYBOX.read_bytes(), epoch=EPOCH, dmsetup=_dmsetup(),
                              find_library=_host_lib)
    assert {"dm_mod", "dm_bufio", "dm_verity"} <= set(loaded)
    listing = subprocess.run(["cpio", "-it"], input=boot.read_bytes(), capture_output=True,
                             check=True).stdout.decode().split()
    assert {"sbin/dmsetup", "lib/libdevmapper.so.1.02.1", "lib64/ld-linux-x86-64.so.2"} <= set(listing)
    img = _root(tmp_path, "#!/bin/busybox sh\n/bin/busybox echo VERIFIED-ROOT-UP\n"
                "/bin/busybox poweroff -f\n")
    block = _first_block_of(img, "/bin/busybox")
    v = verity.append_hash_tree(img, workdir=tmp_path)
    cmdline = verity.with_verity("console=ttyS0 panic=-1", v)

    def run(image: Path, pattern: str, rundir: Path) -> str:
        spec = qemu.kernel_boot(cloud_kernel.vmlinuz, boot, cmdline, drive=image)
        with qemu.VM(spec, rundir, accel="tcg", memory=256) as vm:
            try:
                vm.wait(console_regex(pattern), timeout=120)
            except VMExited as e:
                return e.console_tail
            return vm.console_tail(80)

    tail = run(img, "^VERIFIED-ROOT-UP", tmp_path / "run1")
    assert "through dm-verity" in tail and "VERIFIED-ROOT-UP" in tail, tail
    bad = tmp_path / "changed.img"
    shutil.copyfile(img, bad)
    with open(bad, "r+b") as f:  # one byte of the root's busybox, which its /init runs
        f.seek(block + 100)
        b = f.read(1)
        f.seek(block + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    tail = run(bad, r"device-mapper: verity: .*data block \d+ is corrupted", tmp_path / "run2")
    assert re.search(rf"device-mapper: verity: .*data block {block // 4096} is corrupted", tail), tail
    assert "VERIFIED-ROOT-UP" not in tail, tail


@pytest.mark.real
@pytest.mark.slow
def test_a_boot_initrd_that_cannot_open_the_root_says_why(cloud_kernel, tmp_path):  # noqa: F811
    """Without dm_verity in the kernel target, or without dmsetup, /init names what to
    add on the console and powers off, rather than mounting the drive unverified."""
    from forge.formats.vm import machine as qemu
    from forge.formats.vm.errors import VMExited
    from forge.formats.vm.probe import console_regex
    _need_veritysetup()
    require(BUSYBOX.is_file(), "busybox-static is not installed")
    require(shutil.which(qemu.QEMU) is not None, "qemu-system-x86_64 missing (qemu-system-x86)")
    full = _modules_tar(cloud_kernel, tmp_path / "k.tar")
    no_dm = tmp_path / "no-dm.tar"
    with tarfile.open(full) as src, tarfile.open(no_dm, "w") as out:
        for m in src:
            if "/drivers/md/" not in m.name:
                out.addfile(m, src.extractfile(m))
    img = _root(tmp_path, "#!/bin/busybox sh\n/bin/busybox echo UNVERIFIED-ROOT-RAN\n")
    cmdline = verity.with_verity("console=ttyS0 panic=-1", verity.append_hash_tree(img, workdir=tmp_path))
    cases = {
        "no dm_verity": (dict(kernel_tar=no_dm, dmsetup=_dmsetup(), find_library=_host_lib),
                         "cannot create the device-mapper device vroot (keep dm_verity in the "
                         "kernel target's modules); powering off"),
        "no dmsetup": (dict(kernel_tar=full),
                       "the command line has dm-mod.create= and this boot initrd has no dmsetup "
                       "(build the image with verity = True); powering off"),
    }
    for i, (kw, said) in enumerate(cases.values()):
        boot = tmp_path / f"boot{i}.img"
        bootinitrd.build(boot, busybox=BUSYBOX.read_bytes(), epoch=EPOCH, **kw)
        spec = qemu.kernel_boot(cloud_kernel.vmlinuz, boot, cmdline, drive=img)
        with qemu.VM(spec, tmp_path / f"run{i}", accel="tcg", memory=256) as vm:
            with pytest.raises(VMExited) as e:
                vm.wait(console_regex("^never printed$"), timeout=120)
        assert f"forge-boot: {said}" in e.value.console_tail, e.value.console_tail
        assert "UNVERIFIED-ROOT-RAN" not in e.value.console_tail
