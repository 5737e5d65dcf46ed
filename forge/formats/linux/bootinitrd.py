"""The boot initrd of the root-image formats (kernel+squashfs, kernel+erofs, kernel+iso):
forge's addition to LinuxKit's files, `N-boot-initrd.img`.

Why it exists: LinuxKit's kernels have squashfs, erofs, isofs and virtio-blk built in and
boot these images with `root=/dev/sda` alone. Debian's cloud kernel has all of them (and
overlayfs) as modules, so something must load them before the root can be mounted; and
the reference init writes to `/` (busybox's applet links in /bin, /var/log, each bundle's
tmp/ and rootfs/ mount points, /etc/resolv.conf), which a read-only image is not.

What it is: one uncompressed newc cpio (no compressor, so no compressor version in its
bytes) holding `bin/busybox` (the root tree's own, which must be static: nothing else of
the root is there yet), the modules of that list which the kernel's module tar holds, in
load order, and `/init`, a busybox script that loads them, mounts the root drive
read-only (`root=`, default /dev/vda, the first virtio disk; `rootfstype=`, default
whichever of squashfs, erofs, iso9660 mounts), puts a tmpfs overlay on it, drops from
the root's etc/forge/modules.load the modules it already loaded (the reference init
would log each one as failing), and switch_roots to the root's /init (else /sbin/init).
A module the tar lacks is assumed built in; if the root still does not mount, /init
says which modules to keep and powers the machine off.

A verified root (forge.formats.disk.verity): when the command line carries
`dm-mod.create="<name>,<uuid>,<minor>,<flags>,<table>"` (one device, one table line),
/init creates that device with `dmsetup create --readonly` before it mounts `root=`
(/dev/dm-0). Busybox has no device-mapper applet and Debian's kernel no dm-init, so such
an initrd also holds Debian's dmsetup at /sbin/dmsetup, its libraries in /lib (found
through their DT_NEEDED, run with LD_LIBRARY_PATH, there is no ld.so.cache) and its
loader at the path it names; and the dm_verity module (with dm_mod and dm_bufio) when
the kernel target keeps it.
"""

from __future__ import annotations

import struct
import tarfile
from pathlib import Path

from forge.formats.linux import elf
from forge.formats.linux import modules as kmod
from forge.formats.linux.cpio import CpioWriter
from forge.formats.linux.errors import BootInitrdError, ModuleError

__all__ = ["MODULES", "INIT", "build", "find_busybox"]

# What mounting a root image from a virtio disk with a writable overlay needs.
MODULES = ("virtio_pci", "virtio_blk", "squashfs", "erofs", "isofs", "overlay", "dm_verity")
BUSYBOX = ("bin/busybox", "usr/bin/busybox", "sbin/busybox")

INIT = r"""#!/bin/busybox sh
# forge's boot initrd: mount the root image read-only with a tmpfs overlay, then
# switch_root into it (see forge/formats/linux/bootinitrd.py).
bb=/bin/busybox
log() { $bb echo "forge-boot: $*"; }
# Powering off, not a panic: the reason stays the console's last line.
fail() { log "$*; powering off"; $bb sleep 1; $bb poweroff -f; }
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs dev /dev
root=/dev/vda fstype= init=
for arg in $($bb cat /proc/cmdline); do
	case $arg in
	root=*) root=${arg#root=} ;;
	rootfstype=*) fstype=${arg#rootfstype=} ;;
	init=*) init=${arg#init=} ;;
	esac
done
while read -r ko; do
	$bb insmod "/$ko" || log "cannot load $ko"
done </modules.load
wait_dev() {
	i=0
	while [ ! -b "$1" ] && [ $i -lt 100 ]; do $bb sleep 0.1; i=$((i + 1)); done
}
dm=$($bb sed -n 's/.*dm-mod[.]create="\([^"]*\)".*/\1/p' /proc/cmdline)
if [ -n "$dm" ]; then
	[ -x /sbin/dmsetup ] || fail "the command line has dm-mod.create= and this boot initrd has no dmsetup (build the image with verity = True)"
	name=${dm%%,*} rest=${dm#*,}
	uuid=${rest%%,*} rest=${rest#*,}
	rest=${rest#*,} table=${rest#*,}
	set -- $table
	wait_dev "$5"
	[ -b "$5" ] || fail "no drive $5 for the device-mapper table (is virtio_blk in the kernel or its modules?)"
	LD_LIBRARY_PATH=/lib DM_DISABLE_UDEV=1 /sbin/dmsetup create --readonly --noudevsync \
		${uuid:+--uuid "$uuid"} "$name" --table "$table" ||
		fail "cannot create the device-mapper device $name (keep dm_verity in the kernel target's modules)"
	log "root: $name is $5 through dm-$3 (root hash ${12})"
fi
wait_dev "$root"
[ -b "$root" ] || fail "no root drive $root (is virtio_blk in the kernel or its modules?)"
mounted=
for t in ${fstype:-squashfs erofs iso9660}; do
	$bb mount -t "$t" -o ro "$root" /lower 2>/dev/null && mounted=$t && break
done
[ -n "$mounted" ] || fail "cannot mount $root as ${fstype:-squashfs, erofs or iso9660} (keep its module in the kernel target's modules)"
new=/lower
if $bb mount -t tmpfs -o mode=0755 rw /rw && $bb mkdir -p /rw/upper /rw/work &&
	$bb mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /root; then
	new=/root
	log "root: $root ($mounted) read-only, writes go to a tmpfs overlay"
else
	log "root: $root read-only (no overlay: keep the overlay module)"
fi
list=$new/etc/forge/modules.load
if [ -f $list ] && [ "$new" = /root ]; then
	while read -r ko; do
		m=${ko##*/}
		m=${m%%.ko*}
		[ -d "/sys/module/$($bb echo "$m" | $bb tr - _)" ] || $bb echo "$ko"
	done <$list >/rw/modules.load
	$bb cat /rw/modules.load >$list
fi
if [ -z "$init" ]; then
	init=/sbin/init
	[ -x $new/init ] && init=/init
fi
$bb umount /proc /sys /dev
exec $bb switch_root $new "$init"
"""


def find_busybox(fragments: list[Path]) -> bytes:
    """The root tree's busybox: the last fragment's that has one (a later one wins)."""
    found = None
    for f in fragments:
        f = Path(f)
        with tarfile.open(f / "rootfs.tar" if f.is_dir() else f) as tf:
            for m in tf:
                if m.isreg() and m.name.lstrip("./") in BUSYBOX:
                    found = tf.extractfile(m).read()
    if found is None:
        raise BootInitrdError("the root filesystem has no bin/busybox, which the boot initrd "
                             "runs: add an init image with a static busybox (the reference "
                             "init, //images/init:init, has one)")
    if _interpreter(found):
        raise BootInitrdError("the root filesystem's busybox is dynamically linked; the boot "
                             "initrd has no libraries: use a static one (Debian's busybox-static)")
    return found


def _interpreter(elf: bytes) -> bool:
    """Whether an ELF executable names a dynamic loader (a PT_INTERP program header)."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64:
        raise BootInitrdError("the root filesystem's busybox is not an ELF executable")
    wide, order = elf[4] == 2, "<" if elf[5] == 1 else ">"
    if wide:
        phoff, = struct.unpack_from(order + "Q", elf, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", elf, 54)
    else:
        phoff, = struct.unpack_from(order + "I", elf, 28)
        phentsize, phnum = struct.unpack_from(order + "HH", elf, 42)
    for k in range(phnum):
        off = phoff + k * phentsize
        if off + 4 <= len(elf) and struct.unpack_from(order + "I", elf, off)[0] == 3:
            return True
    return False


def _modules(kernel_tar: Path | None) -> list[tuple[str, bytes]]:
    """(path, bytes) of MODULES the tar holds, with their dependencies, in load order."""
    if kernel_tar is None or not kernel_tar.is_file():
        return []
    with tarfile.open(kernel_tar) as tf:
        data = {m.name.lstrip("./"): tf.extractfile(m).read()
                for m in tf if m.isfile() and ".ko" in m.name}
    index = {}
    for path, blob in data.items():
        info = kmod.modinfo(blob)
        index[kmod.module_name(path, info)] = (path, info)
    wanted = [m for m in MODULES if m in index]
    try:
        order = kmod.load_order({k: v[1] for k, v in index.items()}, wanted)
    except ModuleError as e:
        raise BootInitrdError(f"the boot initrd's modules: {str(e).strip(chr(39))}") from None
    return [(index[n][0], data[index[n][0]]) for n in order]


def build(out: Path, *, kernel_tar: Path | None, busybox: bytes, epoch: int,
          dmsetup: bytes | None = None, find_library=None) -> list[str]:
    """Write the boot initrd to `out`; the names of the modules it loads. With `dmsetup`
    (Debian's executable), it and what it needs, looked up by soname with `find_library`."""
    mods = _modules(kernel_tar)
    libs = elf.closure(dmsetup, find_library, "dmsetup") if dmsetup is not None else {}
    loader = elf.interpreter(dmsetup, "dmsetup") if dmsetup is not None else None
    with open(out, "wb") as f, CpioWriter(f, mtime=epoch) as w:
        for d in ("bin", "dev", "proc", "sys", "lower", "rw", "root"):
            w.add_dir(d, 0o755)
        w.add_device("dev/console", "c", 5, 1, 0o600)
        w.add_file("bin/busybox", busybox, 0o755)
        w.add_file("init", INIT.encode(), 0o755)
        w.add_file("modules.load", "".join(f"{p}\n" for p, _ in mods).encode(), 0o644)
        made = {"bin", "dev", "proc", "sys", "lower", "rw", "root"}
        if dmsetup is not None:
            for d in ("sbin", "lib"):
                w.add_dir(d, 0o755)
                made.add(d)
            w.add_file("sbin/dmsetup", dmsetup, 0o755)
            for soname, blob in sorted(libs.items()):
                w.add_file(f"lib/{soname}", blob, 0o755)
            if loader and loader.lstrip("/") != f"lib/{loader.rsplit('/', 1)[-1]}":
                _add_parents(w, loader.lstrip("/"), made)
                w.add_file(loader.lstrip("/"), libs[loader.rsplit("/", 1)[-1]], 0o755)
        for path, blob in mods:
            _add_parents(w, path, made)
            w.add_file(path, blob, 0o644)
    return [kmod.module_name(p, {}) for p, _ in mods]


def _add_parents(w: CpioWriter, path: str, made: set) -> None:
    parts = path.split("/")
    for k in range(1, len(parts)):
        d = "/".join(parts[:k])
        if d not in made:
            w.add_dir(d, 0o755)
            made.add(d)
