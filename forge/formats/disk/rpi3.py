"""LinuxKit's `rpi3` format: one tar to extract onto the FAT partition of a Raspberry Pi 3's
SD card (arm64 only). The Pi's GPU firmware starts, reads config.txt, loads u-boot.bin as
the "kernel" in 64-bit mode; U-Boot's distro boot finds boot.scr, which loads the kernel,
the device tree and the initrd from the card and boots them.

    bootcode.bin start.elf start_cd.elf start_x.elf fixup.dat fixup_cd.dat fixup_x.dat
    LICENCE.broadcom           the GPU firmware (Debian's raspi-firmware: LinuxKit's set)
    config.txt                 arm_control=0x200 (64-bit), enable_uart=1, kernel=u-boot.bin
    u-boot.bin                 U-Boot for rpi_3 (Debian's u-boot-rpi)
    boot.scr                   the boot script as a U-Boot script image (mkimage -T script)
    kernel.uimg, initrd.uimg   U-Boot legacy images of the kernel and the initrd
    dtb/broadcom/bcm2837-rpi-3-b*.dtb   the device trees, from the kernel package

Where forge differs from LinuxKit's tools/mkimage-rpi3, on purpose: the kernel command line
is the assembly's (LinuxKit's script hard-codes its own); the initrd is forge's, as for
every format; the script loads the images at addresses far enough apart for a distribution
kernel (Debian's arm64 Image is 32 MiB, uncompressed: it would overlap the device tree at
U-Boot's default addresses) and does not `saveenv` (no write to the card at every boot).
On Debian's kernels the Pi 3's GPIO serial port (the mini UART) is ttyS1.

Reproducible: mkimage takes its header time from SOURCE_DATE_EPOCH; the tar has sorted
names, owner 0:0 with no names, modes 0644/0755 and every time the epoch.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

from forge.formats.disk.errors import DiskImageError
from forge.formats.disk.tools import find_tool, run, tool_env

OUTPUT = "{name}.tar"
FIRMWARE = ("bootcode.bin", "start.elf", "start_cd.elf", "start_x.elf", "fixup.dat",
            "fixup_cd.dat", "fixup_x.dat", "LICENCE.broadcom")
UBOOT = "u-boot.bin"
DTB_DIR = "dtb/broadcom"
DTB_GLOB = "bcm2837-rpi-3-b*.dtb"
CONFIG_TXT = ("avoid_warnings=2\n"
              "# 64-bit mode, serial console, U-Boot as the kernel\n"
              "arm_control=0x200\nenable_uart=1\nkernel=u-boot.bin\n")
# Load addresses: the kernel is moved (or unpacked) to 0x80000 by bootm; the images are read
# high enough that a kernel of up to ~200 MiB unpacked never overlaps them.
KERNEL_AT, DTB_AT, INITRD_AT = 0x10000000, 0x0F000000, 0x14000000
_ARM64_MAGIC = b"ARM\x64"  # at offset 56 of an arm64 Image header


def output_name(name: str) -> str:
    return OUTPUT.format(name=name)


def tools() -> list[str]:
    """The host tools the format runs (mkimage, from u-boot-tools), for the action key."""
    return [str(find_tool("mkimage"))]


def boot_script(cmdline: str) -> str:
    """U-Boot's script. Single quotes keep the command line literal in U-Boot's shell
    (no `$` expansion, double quotes kept for the kernel)."""
    if "'" in cmdline:
        raise DiskImageError("the rpi3 format cannot put a single quote (') in the kernel "
                             "command line of U-Boot's boot script; remove it")
    return (f"setenv bootargs '{cmdline}'\n"
            f"fatload mmc 0:1 {KERNEL_AT:#x} kernel.uimg\n"
            f"fatload mmc 0:1 {DTB_AT:#x} dtb/${{fdtfile}}\n"
            f"fatload mmc 0:1 {INITRD_AT:#x} initrd.uimg\n"
            f"bootm {KERNEL_AT:#x} {INITRD_AT:#x} {DTB_AT:#x}\n")


def _kernel_compression(kernel: Path) -> str:
    """`gzip` for an Image.gz, `none` for a bare Image; anything else is not an arm64 kernel."""
    with open(kernel, "rb") as f:
        head = f.read(1 << 16)
    if head[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 64)
        except zlib.error:
            head = b""
        comp = "gzip"
    else:
        comp = "none"
    if head[56:60] != _ARM64_MAGIC:
        raise DiskImageError(f"{kernel.name} is not an arm64 Linux Image (no ARM\\x64 magic in "
                             "its header): the rpi3 format boots arm64 kernels only")
    return comp


def _inputs(firmware: Path, uboot: Path, dtbs: Path) -> list[tuple[str, Path]]:
    files = [(n, firmware / n) for n in FIRMWARE]
    missing = [n for n, p in files if not p.is_file()]
    if missing:
        raise DiskImageError(f"the Raspberry Pi firmware in {firmware} lacks {', '.join(missing)} "
                             "(Debian's raspi-firmware package has them)")
    if not uboot.is_file():
        raise DiskImageError(f"{uboot}: no such file (U-Boot for rpi_3: Debian's u-boot-rpi)")
    found = sorted(dtbs.glob(DTB_GLOB)) if dtbs.is_dir() else []
    if not found:
        raise DiskImageError(f"no {DTB_DIR}/{DTB_GLOB} device tree with the kernel: keep the "
                             "broadcom device trees of an arm64 kernel package "
                             "(linux-image-arm64; the cloud kernel has none)")
    return files + [(UBOOT, uboot)] + [(f"{DTB_DIR}/{p.name}", p) for p in found]


def build(*, kernel: Path, initrd: Path, cmdline: str, firmware: Path, uboot: Path,
          dtbs: Path, name: str, outdir: Path, workdir: Path, epoch: int) -> list[Path]:
    """Write `N.tar` into `outdir`: `firmware` is a directory holding FIRMWARE, `uboot`
    U-Boot's u-boot.bin for rpi_3, `dtbs` the directory of the kernel's broadcom device
    trees. `workdir` is scratch space; `epoch` is SOURCE_DATE_EPOCH."""
    if "\n" in cmdline or "\r" in cmdline:
        raise DiskImageError("the kernel command line must be one line")
    if not name or "/" in name or name in (".", ".."):
        raise DiskImageError(f"image name {name!r} cannot be a file name")
    for p in (kernel, initrd):
        if not Path(p).is_file():
            raise DiskImageError(f"{p}: no such file")
    files = _inputs(Path(firmware), Path(uboot), Path(dtbs))
    comp = _kernel_compression(Path(kernel))
    mkimage = tools()[0]
    workdir.mkdir(parents=True, exist_ok=True)
    outdir.mkdir(parents=True, exist_ok=True)
    env = tool_env(workdir, epoch)
    script = workdir / "boot.script"
    script.write_text(boot_script(cmdline))
    made = {n: workdir / n for n in ("kernel.uimg", "initrd.uimg", "boot.scr")}
    run([mkimage, "-A", "arm64", "-O", "linux", "-T", "kernel", "-C", comp, "-a", "0x80000",
         "-e", "0x80000", "-n", "Linux", "-d", kernel, made["kernel.uimg"]], env)
    run([mkimage, "-A", "arm64", "-O", "linux", "-T", "ramdisk", "-C", "none", "-n", "initrd",
         "-d", initrd, made["initrd.uimg"]], env)
    run([mkimage, "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none", "-n", "RPi3",
         "-d", script, made["boot.scr"]], env)
    files += sorted(made.items())
    out = outdir / output_name(name)
    try:
        _write_tar(out, files, CONFIG_TXT.encode(), epoch)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return [out]


def _info(name: str, epoch: int, *, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    ti.mode, ti.size, ti.mtime = (0o755 if directory else 0o644), size, epoch
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _write_tar(out: Path, files: list[tuple[str, Path]], config: bytes, epoch: int) -> None:
    entries = dict(files)
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tf:
        dirs = sorted({"/".join(n.split("/")[:i]) for n in entries
                       for i in range(1, n.count("/") + 1)})
        for name in sorted([*entries, "config.txt", *(d + "/" for d in dirs)]):
            if name.endswith("/"):
                tf.addfile(_info(name.rstrip("/"), epoch, directory=True))
            elif name == "config.txt":
                tf.addfile(_info(name, epoch, size=len(config)), io.BytesIO(config))
            else:
                src = entries[name]
                with open(src, "rb") as f:
                    tf.addfile(_info(name, epoch, size=src.stat().st_size), f)
