"""The rpi3 format (LinuxKit's Raspberry Pi 3 tar): built by forge from Debian's arm64
packages, its layout and U-Boot headers, byte-identical rebuilds, the analysis errors, and a
boot under QEMU's raspi3b through U-Boot and boot.scr from an SD card made of the tar."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from conftest import Result, Workspace, require
from forge.formats.debian.package import open_data_tar
from forge.formats.debian.sources import debian_mirror, read_sources
from forge.formats.disk import fat, rpi3
from forge.formats.disk.errors import DiskImageError
from forge.formats.disk.tools import tool_env

MARKER = "FORGE-RPI3-OK"
EPOCH = 1700000000
FORGE_EPOCH = 315532800  # forge's SOURCE_DATE_EPOCH (forge/sandbox.py)
# Debian's kernels name the Pi 3's GPIO serial port (the mini UART) ttyS1.
CMDLINE = "console=ttyS1,115200 panic=-1"
INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo {MARKER}
/bin/busybox poweroff -f
"""
# Every file LinuxKit's tools/mkimage-rpi3 puts in its tar (but its uboot.log).
LINUXKIT_FILES = {
    "bootcode.bin", "start.elf", "start_cd.elf", "start_x.elf", "fixup.dat", "fixup_cd.dat",
    "fixup_x.dat", "LICENCE.broadcom", "config.txt", "u-boot.bin", "boot.scr", "kernel.uimg",
    "initrd.uimg", "dtb/broadcom/bcm2837-rpi-3-b.dtb", "dtb/broadcom/bcm2837-rpi-3-b-plus.dtb"}

BUILD = """\
deb_package(name = "fwdeb", package = "raspi-firmware", component = "non-free-firmware",
            arch = "arm64")
deb_package(name = "busybox", package = "busybox-static", arch = "arm64")
rpi_firmware(name = "rpi3_firmware", firmware_deb = ":fwdeb")   # u-boot-rpi: the default
kernel(name = "k", package = "linux-image-arm64", arch = "arm64",
       dtbs = ["broadcom"], modules = ["sdhci_iproc"])
container_image(name = "init", srcs = ["Dockerfile", "init.sh", "busybox.bin"], arch = "arm64")
linuxkit_image(name = "pi", assembly = "pi.yml", formats = ["rpi3"], arch = "arm64",
               firmware = ":rpi3_firmware")
"""
FILES = {
    "forge.toml": "",
    "BUILD": BUILD,
    "Dockerfile": "FROM scratch\nCOPY busybox.bin /bin/busybox\nCOPY init.sh /init\n",
    "init.sh": INIT,
    "pi.yml": f'kernel:\n  image: ":k"\n  cmdline: "{CMDLINE}"\ninit:\n  - ":init"\n',
}


def _workspace(root: Path) -> Workspace:
    root.mkdir(parents=True)
    ws = Workspace(root, root.parent / f"{root.name}-cache")
    ws.write(FILES)
    # COPY keeps a file's mode, as Docker's does: fixed here, not left to the umask.
    (root / "init.sh").chmod(0o755)
    return ws


def _build_pi(ws: Workspace) -> Result:
    # busybox comes from its arm64 package, built by forge, into the init image's context.
    r = ws.build("//:busybox")
    assert r.code == 0, r.err
    with open_data_tar(ws.root / "forge-out/busybox.deb") as tf:
        data = tf.extractfile("./bin/busybox").read()
    (ws.root / "busybox.bin").write_bytes(data)
    (ws.root / "busybox.bin").chmod(0o755)
    t = time.monotonic()
    r = ws.build("//:pi", "//:k", timeout=600)
    assert r.code == 0, r.err
    print(f"forge build //:pi (rpi3): {time.monotonic() - t:.1f} s")
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Workspace:
    require(debian_mirror(read_sources()) is not None, "no Debian mirror in the apt sources")
    try:
        rpi3.tools()
    except DiskImageError as e:
        require(False, str(e))
    ws = _workspace(tmp_path_factory.mktemp("rpi3") / "one")
    _build_pi(ws)
    return ws


def _members(tar: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar) as tf:
        return {m.name: m for m in tf.getmembers()}


def _read(tar: Path, name: str) -> bytes:
    with tarfile.open(tar) as tf:
        return tf.extractfile(name).read()


@pytest.mark.real
def test_layout_is_linuxkits_and_the_headers_decode(built, tmp_path):
    tar = built.root / "forge-out/pi.tar"
    members = _members(tar)
    files = {n for n, m in members.items() if m.isfile()}
    assert LINUXKIT_FILES <= files, LINUXKIT_FILES - files
    assert files - LINUXKIT_FILES <= {"dtb/broadcom/bcm2837-rpi-3-a-plus.dtb"}
    assert list(members) == sorted(members)
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members.values()} == \
        {(0, 0, "", "", FORGE_EPOCH)}
    assert {m.mode for n, m in members.items() if m.isfile()} == {0o644}
    config = _read(tar, "config.txt").decode()
    assert {"arm_control=0x200", "enable_uart=1", "kernel=u-boot.bin"} <= set(config.split())
    kdir = built.root / "forge-out/k"
    assert _read(tar, "dtb/broadcom/bcm2837-rpi-3-b.dtb") == \
        (kdir / "dtb/broadcom/bcm2837-rpi-3-b.dtb").read_bytes()
    fw = built.root / "forge-out/rpi3_firmware"
    for n in (*rpi3.FIRMWARE, rpi3.UBOOT):
        assert _read(tar, n) == (fw / n).read_bytes(), n
    assert b"Broadcom" in _read(tar, "LICENCE.broadcom")
    assert _read(tar, "u-boot.bin")[:4] != b"\x7fELF"  # the raw binary, not uboot.elf
    # The U-Boot images, decoded by U-Boot's own tool.
    headers = {}
    for name in ("kernel.uimg", "initrd.uimg", "boot.scr"):
        (tmp_path / name).write_bytes(_read(tar, name))
        headers[name] = subprocess.run(["mkimage", "-l", tmp_path / name], check=True,
                                       capture_output=True, text=True).stdout
    assert "AArch64 Linux Kernel Image (uncompressed)" in headers["kernel.uimg"]
    assert "Load Address: 00080000" in headers["kernel.uimg"]
    assert f"Data Size:    {(kdir / 'kernel').stat().st_size} Bytes" in headers["kernel.uimg"]
    assert "AArch64 Linux RAMDisk Image (uncompressed)" in headers["initrd.uimg"]
    assert "AArch64 Linux Script" in headers["boot.scr"]
    assert all("Created:      Tue Jan  1 00:00:00 1980" in h for h in headers.values()), headers
    assert _read(tar, "kernel.uimg")[64:] == (kdir / "kernel").read_bytes()
    script = _read(tar, "boot.scr")[72:].decode()  # header (64), then the length table (8)
    assert f"setenv bootargs '{CMDLINE}'" in script and "bootm " in script
    print(f"pi.tar: {tar.stat().st_size} bytes")


@pytest.mark.real
def test_two_workspaces_give_identical_bytes(built, tmp_path):
    """Another path, another cache, another umask, another time zone: the same tar."""
    old = os.umask(0o077)
    try:
        ws = _workspace(tmp_path / "elsewhere" / "two")
        _build_pi(ws)
    finally:
        os.umask(old)
    one, two = (w.root / "forge-out/pi.tar" for w in (built, ws))
    assert hashlib.sha256(one.read_bytes()).digest() == hashlib.sha256(two.read_bytes()).digest()


def _sd_card(tar: Path, workdir: Path) -> Path:
    """The tar's files on the FAT partition of an SD card image, as a user's `tar x` onto a
    card would make it; QEMU wants a card whose size is a power of two."""
    root = workdir / "files"
    with tarfile.open(tar) as tf:
        tf.extractall(root, filter="data")
    files = [(str(p.relative_to(root)), p) for p in sorted(root.rglob("*")) if p.is_file()]
    img = fat.raw_disk(workdir / "sd.img", efi=False, files=files, name="pi", fmt="rpi3-sd",
                       workdir=workdir, env=tool_env(workdir, EPOCH))
    size = img.stat().st_size
    os.truncate(img, 1 << (size - 1).bit_length())
    return img


@pytest.mark.real
def test_boots_on_raspi3b_through_uboot_and_boot_scr(built, tmp_path):
    """QEMU's raspi3b cannot run start.elf, so it plays the firmware's part: u-boot.bin as the
    kernel (config.txt's kernel=), then U-Boot's distro boot finds boot.scr on the card."""
    qemu = shutil.which("qemu-system-aarch64")
    require(qemu is not None, "qemu-system-aarch64 missing (qemu-system-arm)")
    tar = built.root / "forge-out/pi.tar"
    sd = _sd_card(tar, tmp_path)
    uboot = tmp_path / "files/u-boot.bin"
    log = tmp_path / "serial1.log"
    # Serial 0 is the PL011 (Bluetooth on a Pi 3), serial 1 the mini UART: the console.
    argv = [qemu, "-M", "raspi3b", "-accel", "tcg", "-kernel", uboot, "-drive",
            f"if=sd,format=raw,file={sd},snapshot=on", "-serial", "null", "-serial",
            f"file:{log}", "-display", "none", "-monitor", "none", "-no-reboot"]
    t = time.monotonic()
    vm = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = ""
        while time.monotonic() - t < 240 and vm.poll() is None:
            seen = log.read_text(errors="replace") if log.exists() else ""
            if MARKER in seen or "end Kernel panic" in seen:
                break
            time.sleep(0.25)
        tail = "\n".join(seen.splitlines()[-15:])
        assert MARKER in seen, f"no {MARKER} on the console; its tail:\n{tail}"
    finally:
        vm.kill()
        vm.wait()
    assert "Found U-Boot script /boot.scr" in seen and "Starting kernel" in seen
    print(f"raspi3b boot through U-Boot: {time.monotonic() - t:.1f} s to {MARKER}")


# --- analysis errors and bad inputs (no network, no tools) -----------------------------------

def _plan(ws: Workspace, build: str) -> Result:
    ws.write({**FILES, "BUILD": build, "busybox.bin": ""})
    return ws.forge("build", "--nobuild", "//:pi")


def test_rpi3_of_an_amd64_kernel_is_an_analysis_error(ws):
    r = _plan(ws, BUILD.replace('package = "linux-image-arm64", arch = "arm64",',
                                'package = "linux-image-cloud-amd64",')
              .replace('arch = "arm64")\nlinuxkit_image', ')\nlinuxkit_image')
              .replace('formats = ["rpi3"], arch = "arm64",', 'formats = ["rpi3"],'))
    assert r.code == 2, r.err
    assert "format rpi3 boots arm64 images only; this image is for amd64" in r.err
    assert 'arch = "arm64"' in r.err and "Traceback" not in r.err


def test_rpi3_without_firmware_names_the_rule_to_add(ws):
    r = _plan(ws, BUILD.replace('               firmware = ":rpi3_firmware")', ")"))
    assert r.code == 2, r.err
    assert "format rpi3 needs the Raspberry Pi firmware and U-Boot" in r.err
    assert 'rpi_firmware(name = "rpi3_firmware")' in r.err
    r = _plan(ws, BUILD.replace('firmware = ":rpi3_firmware"', 'firmware = ":fwdeb"'))
    assert r.code == 2 and ":fwdeb is not an rpi_firmware target" in r.err, r.err


def test_rpi3_and_tar_cannot_share_a_target(ws):
    r = _plan(ws, BUILD.replace('formats = ["rpi3"]', 'formats = ["tar", "rpi3"]'))
    assert r.code == 2 and "formats tar and rpi3 both write pi.tar" in r.err, r.err


def test_bad_component_and_dtbs_values(ws):
    r = _plan(ws, BUILD.replace('component = "non-free-firmware"', 'component = "nonfree"'))
    assert r.code == 2 and "non-free-firmware" in r.err and "nonfree" in r.err, r.err
    r = _plan(ws, BUILD.replace('dtbs = ["broadcom"]', 'dtbs = ["../broadcom"]'))
    assert r.code == 2 and "dtbs holds '../broadcom', not a vendor directory name" in r.err, r.err


@pytest.mark.real
def test_pins_name_the_component_only_off_main(built):
    import json
    pins = json.loads((built.root / "forge.lock").read_text())["pins"]
    assert {"bookworm/arm64/non-free-firmware/raspi-firmware", "bookworm/arm64/u-boot-rpi",
            "bookworm/arm64/busybox-static"} <= set(pins["deb"])
    assert json.loads(pins["deb"]["bookworm/arm64/non-free-firmware/raspi-firmware"])[
        "Package"] == "raspi-firmware"


def _fake_inputs(tmp_path: Path, kernel: bytes) -> dict:
    fw = tmp_path / "fw"
    fw.mkdir(parents=True)
    for n in rpi3.FIRMWARE:
        (fw / n).write_bytes(n.encode())
    (fw / rpi3.UBOOT).write_bytes(b"u-boot")
    dtbs = tmp_path / "dtb/broadcom"
    dtbs.mkdir(parents=True)
    (dtbs / "bcm2837-rpi-3-b.dtb").write_bytes(b"\xd0\x0d\xfe\xed")
    (tmp_path / "kernel").write_bytes(kernel)
    (tmp_path / "initrd").write_bytes(b"initrd")
    return dict(kernel=tmp_path / "kernel", initrd=tmp_path / "initrd", cmdline=CMDLINE,
                firmware=fw, uboot=fw / rpi3.UBOOT, dtbs=dtbs, name="pi",
                outdir=tmp_path / "out", workdir=tmp_path / "work", epoch=EPOCH)


ARM64_IMAGE = b"\0" * 56 + b"ARM\x64" + b"\0" * 64


def test_bad_inputs_are_clear_errors(tmp_path):
    args = _fake_inputs(tmp_path, b"\0" * 0x202 + b"HdrS" + b"\0" * 64)  # an x86 bzImage
    with pytest.raises(DiskImageError, match="not an arm64 Linux Image"):
        rpi3.build(**args)
    (tmp_path / "kernel").write_bytes(ARM64_IMAGE)
    with pytest.raises(DiskImageError, match="single quote"):
        rpi3.build(**dict(args, cmdline="init='x'"))
    (args["firmware"] / "start.elf").unlink()
    with pytest.raises(DiskImageError, match="lacks start.elf .*raspi-firmware"):
        rpi3.build(**args)
    (args["firmware"] / "start.elf").write_bytes(b"x")
    shutil.rmtree(args["dtbs"])
    with pytest.raises(DiskImageError, match="no dtb/broadcom/bcm2837-rpi-3-b"):
        rpi3.build(**args)
    assert not (tmp_path / "out/pi.tar").exists()


@pytest.mark.real
def test_a_gzip_kernel_is_a_gzip_uimage_and_rebuilds_identical(tmp_path):
    """Image.gz (LinuxKit's arm64 kernels) goes in as `-C gzip`; umask and path change
    nothing."""
    import gzip
    try:
        rpi3.tools()
    except DiskImageError as e:
        require(False, str(e))
    outs = []
    for i, mask in enumerate((0o022, 0o077)):
        old = os.umask(mask)
        try:
            args = _fake_inputs(tmp_path / f"r{i}", gzip.compress(ARM64_IMAGE, mtime=0))
            [out] = rpi3.build(**args)
        finally:
            os.umask(old)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    with tarfile.open(fileobj=io.BytesIO(outs[0])) as tf:
        (tmp_path / "k.uimg").write_bytes(tf.extractfile("kernel.uimg").read())
    listing = subprocess.run(["mkimage", "-l", tmp_path / "k.uimg"], check=True,
                             capture_output=True, text=True).stdout
    assert "Kernel Image (gzip compressed)" in listing, listing


def test_a_missing_mkimage_names_its_package(tmp_path, monkeypatch):
    from forge.formats.disk import tools as disk_tools
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(disk_tools, "_SEARCH", ())
    with pytest.raises(DiskImageError, match="mkimage is not installed: install the Debian "
                       "package u-boot-tools"):
        rpi3.tools()
