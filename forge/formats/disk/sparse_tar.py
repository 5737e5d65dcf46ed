"""A tar of one file as a sparse member in GNU's old format (`--format=oldgnu --sparse`),
its holes found by content, for GCE's image archive.

GNU tar itself maps holes only in files the file system stores with holes, and then
either asks the file system (whose answer depends on its block size and on how the file
was written) or, with `--hole-detection=raw`, reads the whole file, a GiB of holes
included. This writer reads only the data part (`data_size` bytes; the rest up to
`size` is known to be a hole) and maps it as GNU tar's raw detection does, so its
output is the bytes `tar --format=oldgnu --sparse --hole-detection=raw --owner=0
--group=0 --numeric-owner` writes for the same content (tests/formats/disk compares
them):

- the file is read in 512-byte blocks from its start; an all-zero block is a hole, a run
  of other blocks is one map entry (offset, length), the last one cut at the file's end;
  when the file ends in a hole the map ends with (size, 0);
- the header (typeflag 'S', magic "ustar  ") holds the first 4 entries, the member's
  real size at byte 483 and the archived size (the data's) as its size; each further
  21 entries take an extension block; `isextended` chains them;
- then the data of the entries, padded to 512; the archive ends with two zero blocks and
  is padded to GNU tar's 10240-byte record.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from forge.formats.disk.errors import DiskImageError

BLOCK = 512
RECORD = 20 * BLOCK
_ZERO = bytes(BLOCK)


def data_map(f: BinaryIO, data_size: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) runs of non-zero 512-byte blocks of the first `data_size`
    bytes of `f`, then (size, 0) if the file of `size` bytes ends in a hole."""
    runs: list[list[int]] = []
    off = 0
    f.seek(0)
    while off < data_size:
        chunk = f.read(min(1 << 20, data_size - off))
        if not chunk:
            raise DiskImageError(f"the file ended at byte {off} of {data_size}")
        view = memoryview(chunk)
        for i in range(0, len(chunk), BLOCK):
            block = view[i:i + BLOCK]
            if block != _ZERO[:len(block)]:
                if runs and runs[-1][0] + runs[-1][1] == off + i:
                    runs[-1][1] += len(block)
                else:
                    runs.append([off + i, len(block)])
        off += len(chunk)
    out = [(a, n) for a, n in runs]
    if not out or out[-1][0] + out[-1][1] < size:
        out.append((size, 0))
    return out


def _octal(n: int, width: int) -> bytes:
    text = f"{n:0{width - 1}o}".encode()
    if len(text) > width - 1:
        raise DiskImageError(f"{n} does not fit a {width}-byte tar field")
    return text + b"\0"


def _entries(entries: list[tuple[int, int]]) -> bytes:
    return b"".join(_octal(a, 12) + _octal(n, 12) for a, n in entries)


def header(name: str, entries: list[tuple[int, int]], size: int, *, mtime: int,
           mode: int = 0o644) -> bytes:
    """The member's header and its extension blocks."""
    raw = name.encode()
    if len(raw) >= 100:
        raise DiskImageError(f"member name {name!r} is too long for an oldgnu header")
    stored = sum(n for _, n in entries)
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(stored, 12)
    h[136:148] = _octal(mtime, 12)
    h[156:157] = b"S"
    h[257:265] = b"ustar  \0"
    first, rest = entries[:4], entries[4:]
    h[386:386 + 24 * len(first)] = _entries(first)
    h[482] = 1 if rest else 0
    h[483:495] = _octal(size, 12)
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}".encode() + b"\0 "
    blocks = [bytes(h)]
    while rest:
        part, rest = rest[:21], rest[21:]
        ext = bytearray(BLOCK)
        ext[0:24 * len(part)] = _entries(part)
        ext[504] = 1 if rest else 0
        blocks.append(bytes(ext))
    return b"".join(blocks)


def write(out: BinaryIO, src: Path, name: str, *, size: int, mtime: int) -> None:
    """Write to `out` a tar holding `src` as the member `name`, `size` bytes long (the
    bytes of `src` followed by a hole: `size` may exceed the file's length)."""
    data_size = src.stat().st_size
    if size < data_size:
        raise DiskImageError(f"{src}: {data_size} bytes, more than the member's {size}")
    with open(src, "rb") as f:
        entries = data_map(f, data_size, size)
        head = header(name, entries, size, mtime=mtime)
        out.write(head)
        written = 0
        for off, n in entries:
            f.seek(off)
            left = n
            while left:
                piece = f.read(min(left, 1 << 20))
                if not piece:
                    raise DiskImageError(f"{src} changed while it was archived")
                out.write(piece)
                left -= len(piece)
            written += n
    total = len(head) + written
    pad = -written % BLOCK
    end = 2 * BLOCK
    out.write(bytes(pad + end + (-(total + pad + end) % RECORD)))
