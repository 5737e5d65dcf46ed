"""LinuxKit's `tar-kernel-initrd`: one tar, `N-initrd.tar`, holding `kernel`, `initrd.img`,
`cmdline` and, when the kernel image has early microcode, `ucode.cpio` (LinuxKit's
outputKernelInitrdTarball), for tools that take the boot files as one archive.

`initrd.img` is the file kernel+initrd writes as N-initrd.img, byte for byte, so it
already starts with the microcode; `ucode.cpio` is there too for LinuxKit's layout (the
kernel's early loader reads only the first archive, so a consumer that prepends it again
boots the same). Members: that order, mode 0644, owner 0:0 without names, times
SOURCE_DATE_EPOCH, POSIX pax format (no extended headers unless a field needs one).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from forge.formats.disk.errors import DiskImageError

NAMES = ("kernel", "initrd.img", "cmdline", "ucode.cpio")


def write(out: Path, *, kernel: Path, initrd: Path, cmdline: Path, ucode: Path | None,
          epoch: int) -> Path:
    if epoch < 0:
        raise DiskImageError(f"SOURCE_DATE_EPOCH {epoch} is before 1970")
    members = [("kernel", kernel), ("initrd.img", initrd), ("cmdline", cmdline)]
    if ucode is not None:
        members.append(("ucode.cpio", ucode))
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, src in members:
            src = Path(src)
            if not src.is_file():
                raise DiskImageError(f"{src}: no such file")
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = src.stat().st_size, 0o644, epoch
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            with open(src, "rb") as f:
                tf.addfile(ti, f)
    return out
