"""Bootable images from a kernel, an initrd and a command line: LinuxKit's iso-bios,
iso-efi, iso-efi-initrd, raw-bios, raw-efi, qcow2-bios and qcow2-efi, with Debian's tools,
without root, loop devices or Docker, byte for byte reproducible.

File names for an assembly named N are LinuxKit's (src/cmd/linuxkit/moby/output.go):
`N.iso`, `N-efi.iso`, `N-efi-initrd.iso`, `N-bios.img`, `N-efi.img`, `N.qcow2`,
`N-efi.qcow2`.

What each image holds:

- iso-bios: ISO 9660 with Rock Ridge, El Torito no-emulation boot of ISOLINUX, and an
  isohybrid MBR so the same file boots from a disk. /isolinux/{isolinux.bin,ldlinux.c32,
  isolinux.cfg}, /boot/{kernel,initrd.img,cmdline}.
- iso-efi: the same tree without ISOLINUX, and a hybrid: a FAT image holding
  /EFI/BOOT/BOOTX64.EFI (GRUB with its config embedded) is appended after the ISO 9660
  tree as partition 2 of a GPT (an EFI System Partition) and is also the El Torito EFI
  boot image, so the file boots as a CD and, written to a disk or a USB stick, as a disk.
  GRUB starts with $root on the device it was loaded from (the CD, or the ESP of the
  disk), so its config first searches for /boot/forge-id-<id>, a file named by a digest
  of the kernel, initrd and command line, and sets $root to the ISO 9660 file system
  that holds it.
- iso-efi-initrd: as iso-efi, with LinuxKit's layout for it: /kernel, /initrd.img,
  /cmdline and /forge-id-<id> at the root.
- raw-bios, raw-efi: a partitioned disk with one FAT partition (diskimage_fat).
- qcow2-*: `qemu-img convert -O qcow2` of the raw image (writes are in order, so the
  cluster layout and the bytes are stable).

The command line: ISOLINUX and SYSLINUX take it verbatim (APPEND). GRUB gets it as the
kernel's own words (`a="b c"` is the word `a=b c`), each single-quoted so that nothing in
it is GRUB syntax; GRUB re-quotes words holding blanks and prepends BOOT_IMAGE=.

Reproducibility: the kernel and initrd go in by graft points and by mtools, never copied
with their own times; xorriso gets every file date and its volume dates from the epoch
(`--set_all_file_dates`, `--modification-date`, which also seeds the isohybrid MBR id);
volume ids come from the name; the FAT side is described in diskimage_fat.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from forge.formats.disk.errors import DiskImageError
from forge.formats.disk import fat
from forge.formats.disk.tools import data_file, find_tool, run, tool_env

__all__ = ["EFI_FORMATS", "FORMATS", "build", "tools", "output_names"]

# format -> output file names, templates of the assembly name {name}
FORMATS: dict[str, tuple[str, ...]] = {
    "iso-bios": ("{name}.iso",),
    "iso-efi": ("{name}-efi.iso",),
    "iso-efi-initrd": ("{name}-efi-initrd.iso",),
    "raw-bios": ("{name}-bios.img",),
    "raw-efi": ("{name}-efi.img",),
    "qcow2-bios": ("{name}.qcow2",),
    "qcow2-efi": ("{name}-efi.qcow2",),
}

# The formats with an EFI System Partition, whose /EFI/BOOT/BOOTX64.EFI is GRUB, or the
# EFI executable given as `efi_loader` (a unified kernel image: forge.formats.disk.uki).
EFI_FORMATS = ("iso-efi", "iso-efi-initrd", "raw-efi", "qcow2-efi")

ISOLINUX = "/usr/lib/ISOLINUX/isolinux.bin"
ISOHDPFX = "/usr/lib/ISOLINUX/isohdpfx.bin"
LDLINUX_C32 = "/usr/lib/syslinux/modules/bios/ldlinux.c32"
_EFI_TOOLS = ["grub-mkimage", "mkfs.vfat", "mlabel", "mmd", "mcopy"]
_TOOLS = {
    "iso-bios": ["xorriso"],
    "iso-efi": ["xorriso"] + _EFI_TOOLS,
    "iso-efi-initrd": ["xorriso"] + _EFI_TOOLS,
    "raw-bios": ["sfdisk", "mkfs.vfat", "mlabel", "mmd", "mcopy", "mattrib", "syslinux"],
    "raw-efi": ["sfdisk"] + _EFI_TOOLS,
}
# search (with search_fs_file, from moddep.lst): the EFI ISOs find their ISO 9660 file system.
_ISO_GRUB_MODULES = fat.GRUB_MODULES + ("search",)
_TOOLS["qcow2-bios"] = _TOOLS["raw-bios"] + ["qemu-img"]
_TOOLS["qcow2-efi"] = _TOOLS["raw-efi"] + ["qemu-img"]


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DiskImageError(f"unknown disk image format {fmt!r}; known: {', '.join(FORMATS)}")


def output_names(fmt: str, name: str) -> list[str]:
    _check_format(fmt)
    return [t.format(name=name) for t in FORMATS[fmt]]


def tools(fmt: str) -> list[str]:
    """The host executables and boot-loader files `fmt` reads, absolute and sorted: hash
    them into a cache key so that upgrading one rebuilds. Raises DiskImageError naming
    the Debian package of anything missing."""
    _check_format(fmt)
    out = {find_tool(t) for t in _TOOLS[fmt]}
    if fmt == "iso-bios":
        out |= {data_file(p) for p in (ISOLINUX, ISOHDPFX, LDLINUX_C32)}
    if fmt.endswith("-efi"):
        out |= set(fat.grub_module_files())
    if fmt.startswith("iso-efi"):
        out |= set(fat.grub_module_files(_ISO_GRUB_MODULES))
    if fmt.endswith("-bios") and fmt != "iso-bios":
        out.add(data_file(fat.SYSLINUX_MBR))  # ldlinux.sys/.c32 are inside the syslinux binary
    return sorted(str(p) for p in out)


def build(fmt: str, *, kernel: Path, initrd: Path, cmdline: str, name: str, outdir: Path,
          workdir: Path, epoch: int, efi_loader: Path | None = None,
          sign_key: tuple[Path, Path] | None = None) -> list[Path]:
    """Write `fmt`'s image(s) of `kernel` + `initrd` booting with `cmdline` into `outdir`
    (file names from FORMATS) and return their paths. `workdir` is scratch space (empty,
    private); `epoch` is SOURCE_DATE_EPOCH. On the EFI formats, `efi_loader` replaces GRUB
    as BOOTX64.EFI (taken as it is: a UKI is signed when it is made), and `sign_key`
    (key, certificate) signs GRUB for Secure Boot."""
    _check_format(fmt)
    if (efi_loader or sign_key) and fmt not in EFI_FORMATS:
        raise DiskImageError(f"{fmt} has no EFI System Partition to put a signed or "
                             "unified EFI loader on")
    if "\n" in cmdline or "\r" in cmdline:
        raise DiskImageError("the kernel command line must be one line")
    if not name or "/" in name or name in (".", ".."):
        raise DiskImageError(f"image name {name!r} cannot be a file name")
    if epoch < 0:
        raise DiskImageError(f"SOURCE_DATE_EPOCH {epoch} is before 1970")
    for p in (kernel, initrd):
        if not Path(p).is_file():
            raise DiskImageError(f"{p}: no such file")
    kernel, initrd = Path(kernel).resolve(), Path(initrd).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    tools(fmt)  # every missing tool is reported before anything runs
    env = tool_env(workdir, epoch)
    cmdfile = workdir / "cmdline"
    cmdfile.write_text(cmdline + "\n")
    boot = [("boot/kernel", kernel), ("boot/initrd.img", initrd), ("boot/cmdline", cmdfile)]
    out = outdir / output_names(fmt, name)[0]
    loader = _Loader(efi_loader, sign_key, epoch)
    try:
        _build(fmt, out, boot, cmdline, name, workdir, epoch, env, loader)
    except BaseException:
        out.unlink(missing_ok=True)  # never leave a partial image behind
        raise
    return [out]


class _Loader:
    """What BOOTX64.EFI is: GRUB made from a config (signed if a key is given), or a given
    executable."""

    def __init__(self, given: Path | None, key: tuple[Path, Path] | None, epoch: int):
        self.given, self.key, self.epoch = given, key, epoch

    def make(self, out: Path, config: str, workdir: Path, env: dict[str, str], **kw) -> Path:
        if self.given is not None:
            return Path(self.given)
        grub = fat.grub_efi(out, config, workdir, env, **kw)
        if self.key is not None:
            from forge.formats.disk import sbsign
            sbsign.sign(grub, grub, key=self.key[0], cert=self.key[1], epoch=self.epoch, env=env)
        return grub


def _build(fmt: str, out: Path, boot: list[tuple[str, Path]], cmdline: str, name: str,
           workdir: Path, epoch: int, env: dict[str, str], loader: _Loader) -> None:
    if fmt == "iso-bios":
        cfg = workdir / "isolinux.cfg"
        cfg.write_text(_syslinux_cfg(cmdline))
        files = boot + [("isolinux/isolinux.bin", data_file(ISOLINUX)),
                        ("isolinux/ldlinux.c32", data_file(LDLINUX_C32)),
                        ("isolinux/isolinux.cfg", cfg)]
        _xorriso(out, files, name, epoch, env,
                 ["-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot",
                  "-boot-load-size", "4", "-boot-info-table",
                  "-isohybrid-mbr", data_file(ISOHDPFX)])
    elif fmt.startswith("iso-efi"):
        _efi_iso(out, fmt, boot, cmdline, name, workdir, epoch, env, loader)
    else:
        raw_fmt = fmt.replace("qcow2-", "raw-")
        efi = raw_fmt == "raw-efi"
        fenv = dict(env, SOURCE_DATE_EPOCH=str(fat.fat_epoch(epoch)))
        files = list(boot)
        if efi:
            files.append(("EFI/BOOT/BOOTX64.EFI",
                          loader.make(workdir / "BOOTX64.EFI", _grub_cfg(cmdline), workdir, env)))
        else:
            cfg = workdir / "syslinux.cfg"
            cfg.write_text(_syslinux_cfg(cmdline))
            files.append(("syslinux.cfg", cfg))
        raw = out if fmt == raw_fmt else workdir / output_names(raw_fmt, name)[0]
        fat.raw_disk(raw, efi=efi, files=files, name=name, fmt=raw_fmt, workdir=workdir,
                     env=fenv)
        if raw != out:
            run([find_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2",
                 "-o", "compat=1.1", raw, out], env)
            raw.unlink()


def _efi_iso(out: Path, fmt: str, boot: list[tuple[str, Path]], cmdline: str, name: str,
             workdir: Path, epoch: int, env: dict[str, str], loader: _Loader) -> None:
    top = "boot/" if fmt == "iso-efi" else ""  # iso-efi-initrd: LinuxKit's layout, at the root
    h = hashlib.sha256()
    for _, src in boot:
        with open(src, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    idfile = workdir / "forge-id"
    idfile.write_text(h.hexdigest() + "\n")
    marker = f"{top}forge-id-{h.hexdigest()[:16]}"
    files = [(top + dest.removeprefix("boot/"), src) for dest, src in boot] + [(marker, idfile)]
    cfg = _grub_cfg(cmdline, kernel=f"/{top}kernel", initrd=f"/{top}initrd.img",
                    search=f"/{marker}")
    efi = loader.make(workdir / "BOOTX64.EFI", cfg, workdir, env, modules=_ISO_GRUB_MODULES)
    fenv = dict(env, SOURCE_DATE_EPOCH=str(fat.fat_epoch(epoch)))
    img = fat.fat_image(workdir / "efiboot.img", [("EFI/BOOT/BOOTX64.EFI", efi)],
                        label="EFIBOOT", serial=fat.ids(name, fmt, "fat").int & 0xFFFFFFFF,
                        env=fenv)
    # The ESP is appended as GPT partition 2 and the El Torito EFI entry points at it, so
    # it is stored once; the GPT's GUIDs are derived from a disk GUID of the name.
    _xorriso(out, files, name, epoch, env,
             ["-append_partition", "2", "0xef", img, "-appended_part_as_gpt",
              "--gpt_disk_guid", str(fat.ids(name, fmt, "disk")),
              "-e", "--interval:appended_partition_2:all::", "-no-emul-boot"])


def _syslinux_cfg(cmdline: str) -> str:
    # SERIAL: the loader's own messages reach a headless VM's console too.
    return ("SERIAL 0 115200\nPROMPT 0\nTIMEOUT 0\nDEFAULT linux\nLABEL linux\n"
            f"  KERNEL /boot/kernel\n  INITRD /boot/initrd.img\n  APPEND {cmdline}\n")


def kernel_words(cmdline: str) -> list[str]:
    """The command line split as the kernel splits it: at blanks outside double quotes,
    the quotes removed (`a="b c"` is the one word `a=b c`)."""
    return [w.replace('"', "") for w in re.findall(r'(?:[^\s"]|"[^"]*"?)+', cmdline)]


def _grub_word(word: str) -> str:
    # Single quotes make everything literal in GRUB's lexer; GRUB puts double quotes back
    # around a word holding blanks when it builds the kernel's command line.
    return "'" + word.replace("'", "'\\''") + "'"


def _grub_cfg(cmdline: str, *, kernel: str = "/boot/kernel", initrd: str = "/boot/initrd.img",
              search: str | None = None) -> str:
    """GRUB's embedded config. It runs in GRUB's rescue parser (no `if`), before normal
    mode; `boot` only returns on failure, so the message and halt end a broken image
    instead of leaving it at a prompt. `search`: a file whose file system becomes $root."""
    args = " ".join(_grub_word(w) for w in kernel_words(cmdline))
    find = f"search --no-floppy --set=root --file {_grub_word(search)}\n" if search else ""
    return ("set timeout=0\n"
            f"{find}"
            f"linux {kernel} {args}\n"
            f"initrd {initrd}\n"
            "boot\n"
            f"echo 'forge: GRUB could not boot {kernel}'\n"
            "halt\n")


def volume_id(name: str) -> str:
    return (re.sub(r"[^A-Z0-9_]", "_", name.upper()) or "FORGE")[:32]


def _graft(path: str) -> str:
    return path.replace("\\", "\\\\").replace("=", "\\=")


def _xorriso(out: Path, files: list[tuple[str, Path]], name: str, epoch: int,
             env: dict[str, str], boot: list) -> None:
    stamp = time.strftime("%Y%m%d%H%M%S00", time.gmtime(epoch))
    # Graft points: files go in from where they are, with the dates set below, not theirs.
    grafts = [f"{_graft(dest)}={_graft(str(src))}" for dest, src in sorted(files)]
    run([find_tool("xorriso"), "-no_rc", "-as", "mkisofs", "-o", out, "-V", volume_id(name),
         "-r", "-J", "-joliet-long", "--modification-date=" + stamp,
         "--set_all_file_dates", stamp, *boot, "-graft-points", *grafts], env)
