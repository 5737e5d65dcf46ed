"""Running the host tools that make disk images, so that their output depends on the
inputs alone.

Every tool runs with a fixed environment: `TZ=UTC` (FAT stores local time, so the host's
zone would leak into the bytes), `LC_ALL=C`, `SOURCE_DATE_EPOCH` (mtools, mkfs.fat and
xorriso take "now" from it), `HOME` set to the work directory (xorriso and mtools read
startup files from it) and the `MTOOLS_*` settings spelled out so /etc/mtools.conf cannot
change how names are stored.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from forge.formats.disk.errors import DiskImageError

# Tool -> the Debian package that provides it, for the "install it" hint.
PACKAGES = {
    "xorriso": "xorriso",
    "grub-mkimage": "grub-common",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools", "mmd": "mtools", "mlabel": "mtools", "mattrib": "mtools",
    "syslinux": "syslinux",
    "sfdisk": "fdisk",
    "qemu-img": "qemu-utils",
    "fakeroot": "fakeroot", "tar": "tar",
    "mksquashfs": "squashfs-tools", "mkfs.erofs": "erofs-utils",
    "mkimage": "u-boot-tools",
    "veritysetup": "cryptsetup-bin",
    "sbsign": "sbsigntool", "faketime": "faketime",
}
# Boot-loader data files -> their Debian package.
DATA_PACKAGES = {
    "/usr/lib/ISOLINUX/": "isolinux",
    "/usr/lib/syslinux/modules/bios/": "syslinux-common",
    "/usr/lib/syslinux/mbr/": "syslinux-common",
    "/usr/lib/grub/x86_64-efi/": "grub-efi-amd64-bin",
}
_SEARCH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_TAIL = 20


def find_tool(name: str) -> Path:
    """The absolute path of a host tool; sbin directories are searched too, since a
    non-root PATH often lacks them (mkfs.vfat, sfdisk)."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SEARCH)
    found = shutil.which(name, path=path)
    if found is None:
        raise DiskImageError(f"{name} is not installed: install the Debian package "
                             f"{PACKAGES.get(name, name)}")
    return Path(os.path.abspath(found))  # not resolved: mtools dispatches on its name


def data_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        pkg = next((v for k, v in DATA_PACKAGES.items() if str(p).startswith(k)), None)
        raise DiskImageError(f"{p} is missing" + (f": install the Debian package {pkg}"
                                                  if pkg else ""))
    return p


def tool_env(workdir: Path, epoch: int) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SEARCH),
        "HOME": str(workdir), "TZ": "UTC", "LC_ALL": "C",
        "SOURCE_DATE_EPOCH": str(epoch),
        "MTOOLSRC": os.devnull, "MTOOLS_SKIP_CHECK": "1", "MTOOLS_LOWER_CASE": "0",
        "MTOOLS_NO_VFAT": "0", "MTOOLS_NAME_NUMERIC_TAIL": "1", "MTOOLS_DOTTED_DIR": "0",
    }


def run(argv: list, env: dict[str, str], *, stdin: bytes | None = None,
        cwd: Path | None = None) -> str:
    """Run a tool; its stdout, or a DiskImageError naming the command and its stderr's tail."""
    argv = [str(a) for a in argv]
    try:
        p = subprocess.run(argv, env=env, input=stdin if stdin is not None else b"",
                           capture_output=True, cwd=cwd, timeout=600)
    except FileNotFoundError:
        name = Path(argv[0]).name
        raise DiskImageError(f"{argv[0]} is not installed: install the Debian package "
                             f"{PACKAGES.get(name, name)}") from None
    except subprocess.TimeoutExpired:
        raise DiskImageError(f"{' '.join(argv)}: still running after 600 s") from None
    if p.returncode != 0:
        err = p.stderr.decode("utf-8", "replace").strip().splitlines()
        out = p.stdout.decode("utf-8", "replace").strip().splitlines()
        tail = "\n".join("  " + line for line in (err or out)[-_TAIL:])
        raise DiskImageError(f"{Path(argv[0]).name} failed (exit {p.returncode}): "
                             f"{' '.join(argv)}\n{tail}")
    return p.stdout.decode("utf-8", "replace")
