"""Disk image formats: byte-identical rebuilds (another path, umask and time zone),
contents, and real boots under QEMU (TCG). The conversions of the raw disk (aws, gcp, vhd,
dynamic-vhd, vmdk) and tar-kernel-initrd are built here too, for the rebuild test; their
own checks are in test_disk_conversions.py, their boots in test_redisos.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from boot_fixture import CMDLINE, MARKER, boot_initrd, cloud_kernel  # noqa: F401 (fixtures)
from conftest import require
from forge.formats.disk.errors import DiskImageError
from forge.formats.vm.errors import QemuError
from forge.formats.vm.probe import console_regex
from forge.formats.disk import convert as diskconvert
from forge.formats.disk import images as diskimage
from forge.formats.disk import kernel_tar
from forge.formats.disk import fat as diskimage_fat
from forge.formats.disk import tools as diskimage_tools
from forge.formats.vm import machine as qemu

EPOCH = 1700000000  # 2023-11-14T22:13:20Z
NAME = "demo"


def _have(fmt: str) -> None:
    try:
        diskimage.tools(fmt)
    except DiskImageError as e:
        require(False, str(e))


def _report(fmt: str, path: Path, t: float) -> Path:
    st = path.stat()
    print(f"build {fmt}: {time.monotonic() - t:.2f} s, {path.name} {st.st_size} bytes, "
          f"{st.st_blocks * 512} allocated")
    return path


def _build_all(kernel: Path, initrd: Path, root: Path) -> dict[str, Path]:
    """Every format of forge.formats.disk, the conversions from the raw-bios image."""
    out = {}
    for fmt in diskimage.FORMATS:
        _have(fmt)
        t = time.monotonic()
        [path] = diskimage.build(fmt, kernel=kernel, initrd=initrd, cmdline=CMDLINE, name=NAME,
                                 outdir=root / "out", workdir=root / f"work-{fmt}", epoch=EPOCH)
        out[fmt] = _report(fmt, path, t)
    for fmt in diskconvert.FORMATS:
        try:
            diskconvert.tools(fmt)
        except DiskImageError as e:
            require(False, str(e))
        t = time.monotonic()
        [path] = diskconvert.build(fmt, raw=out[diskconvert.SOURCE], name=NAME,
                                   outdir=root / f"out-{fmt}", workdir=root / f"work-{fmt}",
                                   epoch=EPOCH)
        out[fmt] = _report(fmt, path, t)
    (root / "cmdline").write_text(CMDLINE)
    out["tar-kernel-initrd"] = kernel_tar.write(root / f"{NAME}-initrd.tar", kernel=kernel,
                                                initrd=initrd, cmdline=root / "cmdline",
                                                ucode=None, epoch=EPOCH)
    return out


@pytest.fixture(scope="module")
def images(cloud_kernel, boot_initrd, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    return _build_all(cloud_kernel.vmlinuz, boot_initrd, tmp_path_factory.mktemp("images"))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_file_names_are_linuxkits():
    assert {f: diskimage.output_names(f, "N") for f in diskimage.FORMATS} == {
        "iso-bios": ["N.iso"], "iso-efi": ["N-efi.iso"], "iso-efi-initrd": ["N-efi-initrd.iso"],
        "raw-bios": ["N-bios.img"], "raw-efi": ["N-efi.img"], "qcow2-bios": ["N.qcow2"],
        "qcow2-efi": ["N-efi.qcow2"]}
    assert {f: diskconvert.output_names(f, "N") for f in diskconvert.FORMATS} == {
        "aws": ["N.raw"], "gcp": ["N.img.tar.gz"], "vhd": ["N.vhd"], "dynamic-vhd": ["N.vhd"],
        "vmdk": ["N.vmdk"]}
    with pytest.raises(DiskImageError, match="unknown disk image format 'iso'; known"):
        diskimage.output_names("iso", "N")


def test_kernel_words_and_grub_quoting():
    assert diskimage.kernel_words(' console=ttyS0  a="b c" d=\'x\' ') == [
        "console=ttyS0", "a=b c", "d='x'"]
    cfg = diskimage._grub_cfg('console=ttyS0 a="b $c"')
    assert "linux /boot/kernel 'console=ttyS0' 'a=b $c'\n" in cfg
    with pytest.raises(DiskImageError, match="one line"):
        diskimage.build("iso-bios", kernel=Path("k"), initrd=Path("i"), cmdline="a\nb",
                        name="n", outdir=Path("o"), workdir=Path("w"), epoch=0)


@pytest.mark.real
def test_tools_are_absolute_existing_files():
    for fmt in diskimage.FORMATS:
        _have(fmt)
        paths = diskimage.tools(fmt)
        assert paths == sorted(paths) and all(os.path.isabs(p) and os.path.exists(p) for p in paths)
    names = {Path(p).name for p in diskimage.tools("iso-efi")}
    assert {"xorriso", "grub-mkimage", "mcopy", "kernel.img", "linux.mod", "fat.mod"} <= names
    assert {"isolinux.bin", "ldlinux.c32", "isohdpfx.bin"} <= {Path(p).name for p in diskimage.tools("iso-bios")}
    assert {"syslinux", "sfdisk", "mbr.bin", "qemu-img"} <= {Path(p).name for p in diskimage.tools("qcow2-bios")}


def test_a_missing_tool_names_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(diskimage_tools, "_SEARCH", ())
    with pytest.raises(DiskImageError,
                       match="xorriso is not installed: install the Debian package xorriso"):
        diskimage.tools("iso-bios")
    (tmp_path / "k").write_bytes(b"k")
    with pytest.raises(DiskImageError, match="sfdisk is not installed: install "
                       "the Debian package fdisk"):
        diskimage.build("raw-efi", kernel=tmp_path / "k", initrd=tmp_path / "k", cmdline="",
                        name="n", outdir=tmp_path / "o", workdir=tmp_path / "w", epoch=0)
    assert not (tmp_path / "o" / "n-efi.img").exists()


@pytest.mark.real
def test_a_failing_tool_shows_its_command_and_stderr(tmp_path):
    require(shutil.which("sfdisk", path="/usr/sbin:/sbin") is not None, "sfdisk (fdisk) missing")
    env = diskimage_tools.tool_env(tmp_path, 0)
    with pytest.raises(DiskImageError) as e:
        diskimage_tools.run([diskimage_tools.find_tool("sfdisk"), "--dump",
                             tmp_path / "nothing.img"], env)
    msg = str(e.value)
    assert msg.startswith("sfdisk failed (exit 1): /") and "--dump" in msg
    assert "nothing.img" in msg.splitlines()[-1]  # stderr's tail


@pytest.mark.real
def test_every_format_rebuilds_byte_identical(images, cloud_kernel, boot_initrd,  # noqa: F811
                                               tmp_path, monkeypatch):
    # A second round at least 2 s later (FAT's time resolution and VHD's), at another path,
    # under another time zone and umask: none of them may reach the bytes.
    time.sleep(max(0.0, 2.1 - (time.time() - max(p.stat().st_mtime for p in images.values()))))
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    old = os.umask(0o077)
    try:
        again = _build_all(cloud_kernel.vmlinuz, boot_initrd, tmp_path / "another" / "place")
    finally:
        os.umask(old)
    for fmt, first in images.items():
        assert first.name == again[fmt].name
        assert _sha(first) == _sha(again[fmt]), f"{fmt} differs between two builds"


@pytest.mark.real
def test_contents_dates_and_sparseness(images, cloud_kernel, boot_initrd, tmp_path):  # noqa: F811
    env = diskimage_tools.tool_env(tmp_path, EPOCH)
    kernel = cloud_kernel.vmlinuz.read_bytes()
    for fmt in ("iso-bios", "iso-efi"):
        got = tmp_path / f"{fmt}-kernel"
        subprocess.run(["xorriso", "-no_rc", "-indev", images[fmt], "-osirrox", "on",
                        "-extract", "/boot/kernel", got], env=env, check=True, capture_output=True)
        assert got.read_bytes() == kernel
        listing = subprocess.run(["xorriso", "-no_rc", "-indev", images[fmt], "-lsdl", "/boot"],
                                 env=env, check=True, capture_output=True, text=True).stdout
        assert "Nov 14  2023" in listing and "root" not in listing.replace("0 0", "")
    for fmt in ("raw-bios", "raw-efi"):
        target = f"{images[fmt]}@@{1 << 20}"
        data = subprocess.run(["mcopy", "-i", target, "::/boot/initrd.img", "-"], env=env,
                              check=True, capture_output=True).stdout
        assert data == boot_initrd.read_bytes()
        listing = subprocess.run(["mdir", "-i", target, "::/boot"], env=env, check=True,
                                 capture_output=True, text=True).stdout
        assert listing.count("2023-11-14  22:13") == 5, listing  # ., .., and the 3 files
        serial = diskimage_fat.ids(NAME, fmt, "fat").int & 0xFFFFFFFF
        assert f"Serial Number is {serial >> 16:04X}-{serial & 0xFFFF:04X}" in listing
        st = images[fmt].stat()
        assert st.st_blocks * 512 < st.st_size, f"{fmt} is not sparse"
        # Sized from the contents, not a fixed size.
        assert st.st_size < len(kernel) + boot_initrd.stat().st_size + (8 << 20)
    assert subprocess.run(["qemu-img", "info", images["qcow2-efi"]], capture_output=True,
                          text=True, check=True).stdout.count("file format: qcow2") == 1


def _boot(fmt: str, image: Path, rundir: Path) -> None:
    require(shutil.which(qemu.QEMU) is not None, "qemu-system-x86_64 missing (qemu-system-x86)")
    efi = fmt.endswith("-efi")
    if efi:
        try:
            qemu.ovmf_firmware()
        except QemuError as e:
            require(False, str(e))
    boot = qemu.iso_boot(image, efi=efi) if fmt.startswith("iso") else \
        qemu.disk_boot(image, efi=efi)
    t = time.monotonic()
    before = _sha(image)
    with qemu.VM(boot, rundir, accel="tcg", memory=256) as vm:
        vm.wait(console_regex(f"^{MARKER}$"), timeout=180)
    print(f"boot {fmt}: {time.monotonic() - t:.1f} s to {MARKER}")
    assert _sha(image) == before  # snapshot=on: the cached image is never written


@pytest.mark.real
@pytest.mark.parametrize("fmt", [f for f in diskimage.FORMATS if f != "iso-efi-initrd"])
def test_boots_to_the_marker(fmt, images, tmp_path):
    # iso-efi-initrd is iso-efi with other paths: test_redisos boots it, to PONG.
    _boot(fmt, images[fmt], tmp_path / "run")


@pytest.mark.real
def test_efi_isos_are_hybrids(images, tmp_path):
    """iso-efi and iso-efi-initrd: a GPT whose partition 2 is the ESP, which is also the El
    Torito EFI image, holding GRUB; the ISO 9660 tree holds the files GRUB searches for."""
    env = diskimage_tools.tool_env(tmp_path, EPOCH)
    for fmt, top in (("iso-efi", "/boot"), ("iso-efi-initrd", "")):
        table = json.loads(subprocess.run(["sfdisk", "--json", images[fmt]], capture_output=True,
                                          text=True, check=True).stdout)["partitiontable"]
        assert table["label"] == "gpt" and table["id"] == str(diskimage_fat.ids(NAME, fmt, "disk")).upper()
        esp = next(p for p in table["partitions"] if p["type"] == diskimage_fat.ESP_TYPE)
        assert esp["node"].endswith("2")
        target = f"{images[fmt]}@@{esp['start'] * 512}"
        efi = subprocess.run(["mcopy", "-i", target, "::/EFI/BOOT/BOOTX64.EFI", "-"], env=env,
                             check=True, capture_output=True).stdout
        assert efi[:2] == b"MZ"
        report = subprocess.run(["xorriso", "-no_rc", "-indev", images[fmt], "-report_el_torito",
                                 "plain"], env=env, capture_output=True, text=True).stdout
        lba = re.search(r"El Torito boot img :\s+1\s+UEFI\s+y\s+none\s+\S+\s+\S+\s+\d+\s+(\d+)", report)
        assert lba and int(lba.group(1)) * 2048 == esp["start"] * 512, report
        listing = subprocess.run(["xorriso", "-no_rc", "-indev", images[fmt], "-find", "/",
                                  "-type", "f"], env=env, capture_output=True, text=True).stdout
        files = sorted(line.strip("'") for line in listing.split())
        marker = next(f for f in files if "/forge-id-" in f)
        assert [f for f in files if f != marker] == [f"{top}/cmdline", f"{top}/initrd.img",
                                                   f"{top}/kernel"]
        assert f"search --no-floppy --set=root --file '{marker}'".encode() in efi
