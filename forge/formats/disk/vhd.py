"""VHD, Microsoft's Virtual Hard Disk (Azure, Hyper-V), fixed or dynamic, written by
`qemu-img convert -O vpc` and then made reproducible.

A fixed VHD is the raw disk followed by a 512-byte footer; a dynamic one starts with a
copy of the footer, then a dynamic header and a block allocation table, then the
allocated 2 MiB blocks, and ends with the footer. `force_size` makes the disk exactly as
large as the raw image (Azure requires a whole number of MiB, which forge's disks are)
instead of the nearest CHS geometry.

The footer (VHD specification 1.0, big-endian):

    0   cookie "conectix"     24  timestamp: seconds since 2000-01-01 00:00 UTC
    28  creator application   48  current size       60  disk type (2 fixed, 3 dynamic)
    64  checksum: the one's complement of the sum of the footer's bytes, this field zero
    68  unique id (16 bytes)

qemu-img stamps the timestamp with the current time and the id with a random UUID; both
are rewritten (`fix_footers`): the time from SOURCE_DATE_EPOCH, the id given by the
caller (derived from the disk's content), and the checksum recomputed. Nothing else
qemu-img writes varies between runs (the dynamic header holds parent fields only, all
zero for a disk without parent).
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

from forge.formats.disk.errors import DiskImageError
from forge.formats.disk.tools import find_tool, run

FOOTER = 512
COOKIE = b"conectix"
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z
FIXED, DYNAMIC = 2, 3


def convert(raw: Path, out: Path, *, dynamic: bool, disk_id: uuid.UUID, epoch: int,
            env: dict[str, str]) -> Path:
    sub = "dynamic" if dynamic else "fixed"
    run([find_tool("qemu-img"), "convert", "-f", "raw", "-O", "vpc",
         "-o", f"subformat={sub},force_size", raw, out], env)
    fix_footers(out, disk_id=disk_id, epoch=epoch)
    return out


def checksum(footer: bytes) -> int:
    return ~sum(footer[:64] + b"\0\0\0\0" + footer[68:]) & 0xFFFFFFFF


def fix_footers(path: Path, *, disk_id: uuid.UUID, epoch: int) -> None:
    """Set the timestamp and id of the footer (and of its copy at the start of a dynamic
    disk) and recompute their checksums."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        footer = os.pread(fd, FOOTER, size - FOOTER)
        if size < FOOTER or footer[:8] != COOKIE:
            raise DiskImageError(f"{path}: qemu-img wrote no VHD footer")
        disk_type = struct.unpack_from(">I", footer, 60)[0]
        offsets = [size - FOOTER] + ([0] if disk_type == DYNAMIC else [])
        stamp = max(0, epoch - VHD_EPOCH) & 0xFFFFFFFF
        for off in offsets:
            f = bytearray(os.pread(fd, FOOTER, off))
            if f[:8] != COOKIE:
                raise DiskImageError(f"{path}: no VHD footer at byte {off}")
            struct.pack_into(">I", f, 24, stamp)
            f[68:84] = disk_id.bytes
            struct.pack_into(">I", f, 64, checksum(bytes(f)))
            os.pwrite(fd, bytes(f), off)
    finally:
        os.close(fd)
