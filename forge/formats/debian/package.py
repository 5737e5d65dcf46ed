"""Debian binary packages (`.deb`), read without dpkg.

A `.deb` is an `ar` archive (`!<arch>\\n`, then per member a 60-byte header: name[16]
mtime[12] uid[6] gid[6] mode[8] size[10] "`\\n", the data padded to an even length) of
`debian-binary`, `control.tar[.gz|.xz|.zst]` (`./control`, maintainer scripts) and
`data.tar[.gz|.xz|.zst|.bz2]` (the files). The member's suffix names its compression;
gzip and zstd members are decoded by forge.formats.common.compression, so one made of
several gzip members or zstd frames (`cat`, pzstd) is read to its end, as the formats
define, even where dpkg-deb 1.21 stops after the first zstd frame.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from forge.formats.common.compression import CompressionError, compression_of, open_decompressed
from forge.formats.debian.deb822 import parse_stanzas
from forge.formats.debian.errors import DebError

_AR_MAGIC = b"!<arch>\n"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArMember:
    name: str
    offset: int  # of the member's data in the archive
    size: int


# ---- the ar container ------------------------------------------------------------------

def read_ar(fileobj: BinaryIO) -> list[ArMember]:
    """The members of an ar archive, as positions: nothing but the headers is read."""
    if fileobj.read(8) != _AR_MAGIC:
        raise DebError("not an ar archive (no !<arch> magic)")
    pos, out = 8, []
    while True:
        fileobj.seek(pos)
        head = fileobj.read(60)
        if not head:
            return out
        if len(head) < 60 or head[58:60] != b"`\n":
            raise DebError(f"corrupt ar member header at offset {pos}")
        name = head[:16].decode("ascii", "replace").rstrip()
        size = _decimal(head[48:58], f"the size of ar member {name!r} at offset {pos}")
        data = pos + 60
        if name.startswith("#1/"):  # BSD ar: the name leads the data
            n = _decimal(name[3:].encode(),
                         f"the name length of ar member {name!r} at offset {pos}")
            if n > size:
                raise DebError(f"corrupt ar member header at offset {pos}: its name ({n} bytes) "
                               f"is longer than the member ({size} bytes)")
            name = fileobj.read(n).rstrip(b"\0").decode("utf-8", "replace")
            data, size = data + n, size - n
        out.append(ArMember(name.rstrip("/"), data, size))  # GNU ar ends names with "/"
        pos = data + size + ((data + size) & 1)


def _decimal(field: bytes, what: str) -> int:
    # Digits only: int() would take "-60", and a negative size walks back to the same
    # header forever.
    text = field.strip()
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()):
        raise DebError(f"corrupt ar member header: {what} is {text!r}, not a decimal number")
    return int(text)


class _Section:
    """A byte range of a file, seekable within itself (decompressors rewind to 0)."""

    def __init__(self, f: BinaryIO, offset: int, size: int):
        self._f, self._start, self._size, self._pos = f, offset, size, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, min(self._size, pos + (0, self._pos, self._size)[whence]))
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = self._size - self._pos
        self._f.seek(self._start + self._pos)
        data = self._f.read(left if n is None or n < 0 else min(n, left))
        self._pos += len(data)
        return data


# What a cut-short or corrupt member tar raises from below tarfile (the decompressors).
_CORRUPT = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


class _OwningTarFile(tarfile.TarFile):
    _owned: list = []  # the streams below: closed too, so a plain `with` works
    _what = "the package"

    def close(self) -> None:
        super().close()
        for f in self._owned:
            f.close()

    # A corrupt member tar is a DebError wherever it shows: opening, listing or reading.
    def next(self):
        try:
            return super().next()
        except _CORRUPT as e:
            raise _corrupt(self._what, e) from None

    def extractfile(self, member):
        f = super().extractfile(member)
        return None if f is None else _CheckedReader(f, self._what)


class _CheckedReader:
    def __init__(self, f, what: str):
        self._f, self._what = f, what

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except _CORRUPT as e:
            raise _corrupt(self._what, e) from None

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _corrupt(what: str, e: BaseException) -> DebError:
    return DebError(f"{what} is corrupt: {e or type(e).__name__}")


_DECODED = {".gz": "gzip", ".zst": "zstd"}  # by forge.formats.common.compression
_TAR_MODES = {".tar": "r:", ".xz": "r:xz", ".bz2": "r:bz2"}


def _open_member_tar(deb_path: str | os.PathLike, prefix: str) -> tarfile.TarFile:
    owned = [open(deb_path, "rb")]
    try:
        members = read_ar(owned[0])
        m = next((m for m in members if m.name.startswith(prefix)), None)
        if m is None:
            raise DebError(f"{deb_path}: no {prefix}* member (has {[x.name for x in members]})")
        stream, ext = _Section(owned[0], m.offset, m.size), m.name[len(prefix):] or ".tar"
        if ext in _DECODED:
            # Decoded to the end of the last member or frame, with one error for a cut or
            # corrupt one (tarfile has no zstd before 3.14); spooled, as random tar access
            # seeks back.
            if compression_of(stream.read(4)) != _DECODED[ext]:
                raise DebError(f"{deb_path}: member {m.name} is not {_DECODED[ext]}-compressed")
            stream.seek(0)
            owned.append(tempfile.TemporaryFile())
            try:
                shutil.copyfileobj(open_decompressed(stream, f"{deb_path}: {m.name}"),
                                   owned[-1], _CHUNK)
            except CompressionError as e:
                raise DebError(str(e)) from None
            stream, ext = owned[-1], ".tar"
            stream.seek(0)
        if ext not in _TAR_MODES:
            raise DebError(f"{deb_path}: unknown compression of member {m.name}")
        what = f"member {m.name} of {deb_path}"
        try:
            tf = _OwningTarFile.open(fileobj=stream, mode=_TAR_MODES[ext])
        except _CORRUPT as e:
            raise _corrupt(what, e) from None
        tf._what = what
    except BaseException:
        for f in owned:
            f.close()
        raise
    tf._owned = owned
    return tf


def open_data_tar(deb_path: str | os.PathLike) -> tarfile.TarFile:
    """The package's file tree. gzip and zstd are decoded up front into a temporary
    file; for xz and bz2, reading members in archive order streams and going back
    re-decompresses from the start."""
    return _open_member_tar(deb_path, "data.tar")


def control_fields(deb_path: str | os.PathLike) -> dict[str, str]:
    with _open_member_tar(deb_path, "control.tar") as tf:
        for m in tf:
            if m.name in ("control", "./control"):
                stanzas = parse_stanzas(tf.extractfile(m).read().decode("utf-8", "replace"))
                if stanzas:
                    return stanzas[0]
    raise DebError(f"{deb_path}: control.tar has no control file")
