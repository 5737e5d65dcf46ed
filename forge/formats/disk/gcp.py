"""Google Compute Engine's image layout: a raw disk named `disk.raw`, its size a whole
number of GiB, in a gzip-compressed tar of GNU's old format with sparse members (what
GCE's import documents: `tar --format=oldgnu -Sczf`).

The disk is the BIOS raw disk padded with a hole to the next GiB, so the archive holds
only its data. Reproducibility: GNU tar treats a file as sparse only if the file system
stores it with holes, and then, with `--hole-detection=raw`, maps the holes by reading
for zero blocks, i.e. from the content alone; so the disk is first copied with every
zero 4 KiB block left as a hole (which also undoes a cache that stored it densely), and
a work directory whose file system keeps no holes is an error rather than another
archive. The member's time is SOURCE_DATE_EPOCH, its owner 0:0 without names, its mode
0644; gzip carries no name and no time.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
from pathlib import Path

from forge.formats.disk.errors import DiskImageError
from forge.formats.disk.tools import find_tool, run

DISK = "disk.raw"
GIB = 1 << 30
_BLOCK = 4096


def sparse_copy(src: Path, dest: Path, size: int | None = None) -> Path:
    """Copy `src` to `dest` leaving every all-zero 4 KiB block a hole; `size` pads it."""
    zero = bytes(_BLOCK)
    with open(src, "rb") as f, open(dest, "wb") as out:
        while block := f.read(1 << 20):
            for i in range(0, len(block), _BLOCK):
                piece = block[i:i + _BLOCK]
                if piece == zero[:len(piece)]:
                    out.seek(len(piece), os.SEEK_CUR)
                else:
                    out.write(piece)
        out.truncate(max(out.tell(), size or 0))
    return dest


def build(raw: Path, out: Path, *, workdir: Path, epoch: int, env: dict[str, str],
          level: int = 9) -> Path:
    size = raw.stat().st_size
    disk = sparse_copy(raw, workdir / DISK, -(-size // GIB) * GIB)
    st = disk.stat()
    if st.st_blocks * 512 >= st.st_size:
        raise DiskImageError(f"the file system of {workdir} stores no holes, so the disk "
                             "cannot be archived sparse (GNU tar only maps holes it sees)")
    tar = workdir / "disk.tar"
    run([find_tool("tar"), "--format=oldgnu", "--sparse", "--hole-detection=raw",
         f"--mtime=@{epoch}", "--owner=0", "--group=0", "--numeric-owner", "--mode=0644",
         "-C", workdir, "-cf", tar, DISK], env)
    with open(tar, "rb") as src, open(out, "wb") as f, \
            gzip.GzipFile(fileobj=f, mode="wb", filename="", mtime=0, compresslevel=level) as z:
        shutil.copyfileobj(src, z, 1 << 20)
    return out


def unpack(archive: Path, dest: Path) -> Path:
    """Extract disk.raw from a GCE image archive into directory `dest`, sparse."""
    try:
        with tarfile.open(archive, "r:gz") as tf:
            m = next((m for m in tf if m.name.lstrip("./") == DISK), None)
            if m is None or not m.isfile():
                raise DiskImageError(f"{archive}: holds no file {DISK}")
            data = tf.extractfile(m)
            path = Path(dest) / DISK
            with open(path, "wb") as out:
                for offset, length in (m.sparse or [(0, m.size)]):
                    data.seek(offset)
                    out.seek(offset)
                    shutil.copyfileobj(_Limited(data, length), out, 1 << 20)
                out.truncate(m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DiskImageError(f"{archive}: cannot be read as a GCE image archive: {e}") from None
    return path


class _Limited:
    def __init__(self, f, n: int):
        self.f, self.n = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.n if size < 0 else min(size, self.n)
        b = self.f.read(size)
        self.n -= len(b)
        return b
