"""VMDK, VMware's disk format, as LinuxKit writes it: `qemu-img convert -O vmdk -c -o
adapter_type=lsilogic,subformat=streamOptimized,compat6` (a compressed, stream-optimised
sparse extent for an LSI Logic SCSI adapter, virtual hardware version 6), made
reproducible.

The file starts with a sparse extent header (little-endian: magic "KDMV", ...,
descriptorOffset at byte 28 and descriptorSize at 36, both in sectors) and an embedded
text descriptor. qemu-img writes a random content id (`CID=` in the descriptor) and the
output file's base name in the extent line; every other byte follows from the input
(grains are deflated in order). `fix_cid` rewrites the CID with one the caller derives
from the content; the extent line is right as long as the file keeps the name it was
converted to, so conversion writes the final name.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from forge.formats.disk.errors import DiskImageError
from forge.formats.disk.tools import find_tool, run

SECTOR = 512
OPTIONS = "adapter_type=lsilogic,subformat=streamOptimized,compat6"


def convert(raw: Path, out: Path, *, cid: int, env: dict[str, str]) -> Path:
    run([find_tool("qemu-img"), "convert", "-c", "-f", "raw", "-O", "vmdk", "-o", OPTIONS,
         raw, out], env)
    fix_cid(out, cid)
    return out


def descriptor(path: Path) -> tuple[int, int, str]:
    """(byte offset, byte size, text) of the descriptor embedded in a sparse extent."""
    with open(path, "rb") as f:
        head = f.read(SECTOR)
        if head[:4] != b"KDMV":
            raise DiskImageError(f"{path}: not a VMDK sparse extent (no KDMV magic)")
        off, size = struct.unpack_from("<QQ", head, 28)
        if not (0 < off and 0 < size <= 64):
            raise DiskImageError(f"{path}: no embedded descriptor")
        f.seek(off * SECTOR)
        text = f.read(size * SECTOR).split(b"\0", 1)[0].decode("ascii")
    return off * SECTOR, size * SECTOR, text


def fix_cid(path: Path, cid: int) -> None:
    off, size, text = descriptor(path)
    new, n = re.subn(r"(?m)^CID=[0-9a-fA-F]+$", f"CID={cid & 0xFFFFFFFF:08x}", text)
    if n != 1:
        raise DiskImageError(f"{path}: the descriptor has no CID line")
    data = new.encode("ascii")
    if len(data) >= size:
        raise DiskImageError(f"{path}: the descriptor does not fit its {size} bytes")
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data.ljust(size, b"\0"), off)
    finally:
        os.close(fd)
