"""Google Compute Engine's image layout: a raw disk named `disk.raw`, its size a whole
number of GiB, in a gzip-compressed tar of GNU's old format with the disk as a sparse
member (what GCE's import documents: `tar --format=oldgnu -Sczf`).

The disk is the BIOS raw disk followed by a hole up to the next GiB, so the archive holds
only its data; sparse_tar writes it with the holes found by content (GNU tar's own
mapping would depend on the file system). The member's time is SOURCE_DATE_EPOCH, its
owner 0:0 without names, its mode 0644; gzip carries no name and no time.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

from forge.formats.disk import sparse_tar
from forge.formats.disk.errors import DiskImageError

DISK = "disk.raw"
GIB = 1 << 30


def build(raw: Path, out: Path, *, epoch: int, level: int = 9) -> Path:
    size = -(-raw.stat().st_size // GIB) * GIB
    with open(out, "wb") as f, \
            gzip.GzipFile(fileobj=f, mode="wb", filename="", mtime=0, compresslevel=level) as z:
        sparse_tar.write(z, raw, DISK, size=size, mtime=epoch)
    return out


def unpack(archive: Path, dest: Path) -> Path:
    """Extract disk.raw from a GCE image archive into directory `dest`, keeping its holes."""
    path = Path(dest) / DISK
    try:
        with tarfile.open(archive, "r:gz") as tf:
            m = next((m for m in tf if m.name.lstrip("./") == DISK), None)
            if m is None or not m.isfile():
                raise DiskImageError(f"{archive}: holds no file {DISK}")
            data = tf.extractfile(m)
            with open(path, "wb") as out:
                for offset, length in (m.sparse or [(0, m.size)]):
                    data.seek(offset)
                    out.seek(offset)
                    while length > 0:
                        piece = data.read(min(length, 1 << 20))
                        if not piece:
                            raise DiskImageError(f"{archive}: {DISK} is cut short")
                        out.write(piece)
                        length -= len(piece)
                out.truncate(m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DiskImageError(f"{archive}: cannot be read as a GCE image archive: {e}") from None
    return path
