"""FAT file systems, partitioned disks and the boot loaders inside them, made without root,
loop devices or mounts: sfdisk writes the partition table into a plain file, mkfs.vfat
formats at an offset, mtools (`-i file@@offset`) writes the files, `syslinux --offset`
installs its boot sector and ldlinux.sys.

Disk layout (512-byte sectors):

    0            raw-bios: syslinux's mbr.bin (440 bytes of boot code) and a DOS partition
                 table whose one partition is active; raw-efi: a protective MBR, the GPT
                 header at 1 and its entries at 2..33
    2048         partition 1 (1 MiB aligned), FAT16 below 512 MiB, else FAT32:
                     /boot/kernel  /boot/initrd.img  /boot/cmdline
                     raw-bios: /syslinux.cfg, /ldlinux.sys and /ldlinux.c32 (installed)
                     raw-efi:  /EFI/BOOT/BOOTX64.EFI (GRUB with its config embedded)
    last 2048    raw-efi only: room for the backup GPT

The partition is sized from its contents (a 1/16 margin plus 2 MiB for FAT tables and
directories, at least 16 MiB) and the file is sparse: never-written ranges hold no blocks.
Fixed identities: the disk id / GUIDs and the FAT serial are derived from the image's name
and format (`ids`), the FAT label entry is written by mlabel under SOURCE_DATE_EPOCH
(mkfs.fat would stamp the current time into it; its --invariant, which must come before
-i or it replaces the serial with 0x1234ABCD, fixes its other clock-derived fields), and every timestamp mtools writes is
SOURCE_DATE_EPOCH clamped to 1980-01-01, the earliest date FAT can store.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from forge.formats.disk.errors import DiskImageError
from forge.formats.disk.tools import data_file, find_tool, run

SECTOR = 512
ALIGN = 2048  # sectors: partitions start on 1 MiB
MIB = 1 << 20
FAT_EPOCH = 315532800  # 1980-01-01T00:00:00Z
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
SYSLINUX_MBR = "/usr/lib/syslinux/mbr/mbr.bin"
GRUB_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")
# What the embedded config needs (efi_gop: a framebuffer for the kernel, and no "no
# suitable video mode" complaint); grub-mkimage adds their dependencies from moddep.lst.
GRUB_MODULES = ("part_gpt", "part_msdos", "fat", "iso9660", "linux", "boot", "echo", "halt",
                "efi_gop")
_NS = uuid.UUID("3b6f0b52-6d1c-4a55-9a0e-5f6f72676500")  # forge's namespace for image ids


def ids(name: str, fmt: str, role: str) -> uuid.UUID:
    """A stable identity for one part of one image: same name and format, same id."""
    return uuid.uuid5(_NS, f"{fmt}\0{name}\0{role}")


def fat_epoch(epoch: int) -> int:
    return max(epoch, FAT_EPOCH)


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def fat_size(payload: int) -> int:
    return max(16 * MIB, round_up(payload + payload // 16 + 2 * MIB, MIB))


def make_fat(img: Path, *, offset: int, size: int, label: str, serial: int,
             files: list[tuple[str, Path]], env: dict[str, str]) -> str:
    """Format `size` bytes of `img` at byte `offset` as FAT and copy `files` (FAT path ->
    host file) in; returns the target for further mtools calls (`img@@offset`)."""
    bits = 32 if size >= 512 * MIB else 16
    argv = [find_tool("mkfs.vfat"), "--invariant", "-i", f"{serial:08X}", "-F", bits,
            "--mbr=n", "-h", offset // SECTOR]
    if offset:
        argv.append(f"--offset={offset // SECTOR}")
    run(argv + [img, size // 1024], env)
    target = f"{img}@@{offset}"
    _fill(target, label, files, env)
    return target


def _fill(target: str, label: str, files: list[tuple[str, Path]], env: dict[str, str]) -> None:
    run([find_tool("mlabel"), "-i", target, f"::{label}"], env)
    dirs = sorted({"/".join(p.strip("/").split("/")[:i]) for p, _ in files
                   for i in range(1, p.strip("/").count("/") + 1)})
    if dirs:
        run([find_tool("mmd"), "-i", target] + [f"::/{d}" for d in dirs], env)
    for dest, src in sorted(files):
        # No -m: the file's time is "now", which mtools takes from SOURCE_DATE_EPOCH.
        run([find_tool("mcopy"), "-i", target, "-D", "o", src, f"::/{dest.strip('/')}"], env)


def fat_image(img: Path, files: list[tuple[str, Path]], *, label: str, serial: int,
              env: dict[str, str]) -> Path:
    """A bare FAT file system (no partition table) just big enough for `files`: the EFI
    boot image of an ISO."""
    payload = sum(round_up(p.stat().st_size, 4096) for _, p in files)
    size = round_up(payload + payload // 16 + 256 * 1024, MIB)
    with open(img, "wb") as f:
        f.truncate(size)
    # FAT12 below 16 MiB is what mkfs.fat would pick, and what El Torito images use.
    bits = 12 if size < 16 * MIB else 16
    run([find_tool("mkfs.vfat"), "--invariant", "-i", f"{serial:08X}", "-F", bits,
         "--mbr=n", img, size // 1024], env)
    _fill(str(img), label, files, env)
    return img


def grub_module_files(modules=GRUB_MODULES) -> list[Path]:
    """The files grub-mkimage reads: kernel.img and the modules with their dependencies."""
    deps: dict[str, list[str]] = {}
    for line in data_file(GRUB_EFI_DIR / "moddep.lst").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod.strip()] = rest.split()
    todo, seen = list(modules), set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += deps.get(m, [])
    return [data_file(GRUB_EFI_DIR / "kernel.img"), data_file(GRUB_EFI_DIR / "moddep.lst")] + \
        [data_file(GRUB_EFI_DIR / f"{m}.mod") for m in sorted(seen)]


def grub_efi(out: Path, config: str, workdir: Path, env: dict[str, str], *,
             modules=GRUB_MODULES) -> Path:
    """BOOTX64.EFI: GRUB with `config` embedded and `modules` built in.
    grub-mkimage writes no time into the image (grub-mkrescue and grub-mkstandalone do)."""
    grub_module_files(modules)  # a clear error when grub-efi-amd64-bin is missing
    cfg = workdir / "grub-embed.cfg"
    cfg.write_text(config)
    run([find_tool("grub-mkimage"), "-O", "x86_64-efi", "-d", GRUB_EFI_DIR, "-p", "/EFI/BOOT",
         "-c", cfg, "-o", out, *modules], env)
    return out


def _sfdisk(img: Path, script: str, env: dict[str, str]) -> None:
    run([find_tool("sfdisk"), "--no-reread", "--no-tell-kernel", "--wipe", "never", "-q",
         img], env, stdin=script.encode())


def raw_disk(out: Path, *, efi: bool, files: list[tuple[str, Path]], name: str, fmt: str,
             workdir: Path, env: dict[str, str]) -> Path:
    """A partitioned disk with one FAT partition holding `files`; BIOS-bootable with
    syslinux (efi=False: `files` must hold syslinux.cfg) or EFI-bootable (efi=True:
    `files` must hold EFI/BOOT/BOOTX64.EFI)."""
    payload = sum(round_up(p.stat().st_size, 4096) for _, p in files) + 512 * 1024
    fs = fat_size(payload)
    tail = ALIGN * SECTOR if efi else 0
    total = ALIGN * SECTOR + fs + tail
    with open(out, "wb") as f:
        f.truncate(total)  # sparse: only what the tools write takes blocks
    sectors = fs // SECTOR
    if efi:
        script = (f"label: gpt\nlabel-id: {ids(name, fmt, 'disk')}\nunit: sectors\n"
                  f"first-lba: {ALIGN}\n"
                  f"start={ALIGN}, size={sectors}, type={ESP_TYPE}, "
                  f"uuid={ids(name, fmt, 'esp')}, name=\"EFI System\"\n")
    else:
        disk_id = ids(name, fmt, "disk").int & 0xFFFFFFFF
        ptype = "c" if fs >= 512 * MIB else "e"
        script = (f"label: dos\nlabel-id: 0x{disk_id:08x}\nunit: sectors\n"
                  f"start={ALIGN}, size={sectors}, type={ptype}, bootable\n")
    _sfdisk(out, script, env)
    serial = ids(name, fmt, "fat").int & 0xFFFFFFFF
    make_fat(out, offset=ALIGN * SECTOR, size=fs, label="EFI" if efi else "FORGE",
             serial=serial, files=files, env=env)
    if not efi:
        # syslinux writes the partition's boot sector and ldlinux.sys/.c32 (embedded in the
        # installer) through mtools, so their times also come from SOURCE_DATE_EPOCH.
        run([find_tool("syslinux"), "--install", "--offset", ALIGN * SECTOR, out], env)
        mbr = data_file(SYSLINUX_MBR).read_bytes()
        if len(mbr) > 440:
            raise DiskImageError(f"{SYSLINUX_MBR}: {len(mbr)} bytes, more than the 440 of "
                                 "an MBR's boot code")
        fd = os.open(out, os.O_WRONLY)
        try:
            os.pwrite(fd, mbr, 0)
        finally:
            os.close(fd)
    return out
