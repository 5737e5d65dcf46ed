"""LinuxKit's cloud and hypervisor formats, each the BIOS raw disk (images.py's raw-bios:
MBR, one FAT partition, SYSLINUX) in another container. LinuxKit's images for these
(mkimage, mkimage-gcp, -vhd, -dynamic-vhd, -vmdk) all boot by BIOS from an MBR disk with
SYSLINUX/EXTLINUX, and so do these.

    aws          N.raw          the raw disk as it is (EC2 imports raw disks)
    gcp          N.img.tar.gz   disk.raw, padded to a whole GiB, in a sparse oldgnu tar, gzip
    vhd          N.vhd          fixed VHD (Azure), exactly the raw disk's size
    dynamic-vhd  N.vhd          dynamic VHD (Hyper-V), only the allocated 2 MiB blocks
    vmdk         N.vmdk         stream-optimised VMDK for an LSI Logic adapter (VMware)

LinuxKit sizes these disks to 1 GiB (25 GiB for dynamic-vhd) with ext4; forge's disk is
as large as its contents need (see fat.py) and sparse, except gcp's, which GCE wants in
whole GiB. The identities qemu-img would draw at random (the VHD id, the VMDK CID) are
derived from the raw disk's digest, the name and the format; times come from
SOURCE_DATE_EPOCH. See vhd.py, vmdk.py, gcp.py.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from forge.formats.disk import gcp, vhd, vmdk
from forge.formats.disk.errors import DiskImageError
from forge.formats.disk.tools import find_tool, tool_env

__all__ = ["FORMATS", "SOURCE", "build", "output_names", "tools"]

FORMATS: dict[str, tuple[str, ...]] = {
    "aws": ("{name}.raw",),
    "gcp": ("{name}.img.tar.gz",),
    "vhd": ("{name}.vhd",),
    "dynamic-vhd": ("{name}.vhd",),
    "vmdk": ("{name}.vmdk",),
}
SOURCE = "raw-bios"  # the images.py format every one of these is converted from
_TOOLS = {"aws": [], "gcp": [], "vhd": ["qemu-img"], "dynamic-vhd": ["qemu-img"],
          "vmdk": ["qemu-img"]}
_NS = uuid.UUID("6a1c9f0e-3d2b-5e47-8f10-7c6b5a493827")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DiskImageError(f"unknown disk conversion {fmt!r}; known: {', '.join(FORMATS)}")


def output_names(fmt: str, name: str) -> list[str]:
    _check_format(fmt)
    return [t.format(name=name) for t in FORMATS[fmt]]


def tools(fmt: str) -> list[str]:
    """The host executables `fmt` runs on top of the raw disk, absolute and sorted, for the
    cache key; DiskImageError naming the Debian package of one that is missing."""
    _check_format(fmt)
    return sorted(str(find_tool(t)) for t in _TOOLS[fmt])


def sparse_copy(src: Path, dest: Path) -> Path:
    """Copy `src` leaving its all-zero 4 KiB blocks as holes, as the raw disk was made."""
    zero = bytes(4096)
    with open(src, "rb") as f, open(dest, "wb") as out:
        while block := f.read(1 << 20):
            for i in range(0, len(block), 4096):
                piece = block[i:i + 4096]
                if piece == zero[:len(piece)]:
                    out.seek(len(piece), os.SEEK_CUR)
                else:
                    out.write(piece)
        out.truncate(out.tell())
    return dest


def content_id(raw: Path, name: str, fmt: str) -> uuid.UUID:
    with open(raw, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return uuid.uuid5(_NS, f"{fmt}\0{name}\0{digest}")


def build(fmt: str, *, raw: Path, name: str, outdir: Path, workdir: Path,
          epoch: int) -> list[Path]:
    """Write `fmt`'s file, converted from the BIOS raw disk `raw`, into `outdir` and
    return its path. `workdir` is scratch space; `epoch` is SOURCE_DATE_EPOCH."""
    _check_format(fmt)
    if not name or "/" in name or name in (".", ".."):
        raise DiskImageError(f"image name {name!r} cannot be a file name")
    if epoch < 0:
        raise DiskImageError(f"SOURCE_DATE_EPOCH {epoch} is before 1970")
    raw = Path(raw)
    if not raw.is_file():
        raise DiskImageError(f"{raw}: no such file")
    tools(fmt)  # every missing tool is reported before anything runs
    outdir.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    env = tool_env(workdir, epoch)
    out = outdir / output_names(fmt, name)[0]
    try:
        if fmt == "aws":
            sparse_copy(raw, out)
        elif fmt == "gcp":
            gcp.build(raw, out, epoch=epoch)
        elif fmt in ("vhd", "dynamic-vhd"):
            vhd.convert(raw, out, dynamic=fmt == "dynamic-vhd",
                        disk_id=content_id(raw, name, fmt), epoch=epoch, env=env)
        else:
            vmdk.convert(raw, out, cid=content_id(raw, name, fmt).int & 0xFFFFFFFF, env=env)
    except BaseException:
        out.unlink(missing_ok=True)  # never leave a partial image behind
        raise
    return [out]
