"""Compressed streams told apart by their first bytes, as tar, Docker and the kernel do.

gzip (`1f 8b`) and zstd (`28 b5 2f fd`) are recognised; anything else is taken as plain.
zstd needs the optional `zstandard` module (not in the standard library before Python
3.14); its absence is an error naming the module, never a misread stream.
"""

from __future__ import annotations

import gzip
import io
import zlib
from typing import BinaryIO, Iterator

from forge.formats.errors import FormatError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class CompressionError(FormatError):
    """A stream cannot be decompressed: a decoder is missing or the stream is cut short."""


def compression_of(head: bytes) -> str:
    """`gzip`, `zstd` or `none`, from the first bytes of a blob."""
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC:
        return "zstd"
    return "none"


def _zstandard(what: str):
    try:
        import zstandard
    except ImportError:
        raise CompressionError(f"{what} is zstd-compressed, but the zstandard module is not "
                               "installed (pip install zstandard)") from None
    return zstandard


class _Prefixed(io.RawIOBase):
    """A non-seekable stream whose first bytes were already read to sniff its type."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._rest.read(len(b))
        b[:len(data)] = data
        return len(data)


def open_decompressed(fileobj: BinaryIO, what: str = "the stream") -> BinaryIO:
    """A readable stream of `fileobj`'s uncompressed bytes (gzip, zstd or plain)."""
    if fileobj.seekable():
        pos = fileobj.tell()
        head = fileobj.read(4)
        fileobj.seek(pos)
    else:
        head = fileobj.read(4)
        fileobj = io.BufferedReader(_Prefixed(head, fileobj))
    kind = compression_of(head)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=fileobj, mode="rb")
    if kind == "zstd":
        return _zstandard(what).ZstdDecompressor().stream_reader(fileobj)
    return fileobj


class StreamDecompressor:
    """Push-style decompression of a stream arriving in chunks (a download), to hash its
    uncompressed bytes on the way: `feed` each chunk, then `finish`; both yield output."""

    def __init__(self, what: str):
        self.what, self.kind, self.d, self.head = what, None, None, b""

    def _start(self, head: bytes) -> None:
        kind = compression_of(head)
        if kind == "gzip":
            self.kind, self.d = "gzip", zlib.decompressobj(31)
        elif kind == "zstd":
            self.kind, self.d = "zstd", _zstandard(self.what).ZstdDecompressor().decompressobj()
        else:
            self.kind = "tar"

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if self.kind is None:
            self.head += chunk
            if len(self.head) < 4:
                return
            self._start(self.head)
            chunk, self.head = self.head, b""
        if self.kind == "tar":
            yield chunk
        elif self.kind == "zstd":
            yield self.d.decompress(chunk)
        else:
            while chunk:
                yield self.d.decompress(chunk, 1 << 22)
                chunk = self.d.unconsumed_tail
                if self.d.eof:  # concatenated gzip members (pigz) or zero padding
                    rest = self.d.unused_data + chunk
                    if rest.strip(b"\0"):
                        self.d = zlib.decompressobj(31)
                        chunk = rest
                    else:
                        chunk = b""

    def finish(self) -> Iterator[bytes]:
        if self.kind is None and self.head:
            head, self.head = self.head, b""
            self._start(head)
            yield from self.feed(head)
        if self.kind == "gzip" and not self.d.eof:
            raise CompressionError(f"{self.what}: the gzip stream is truncated")
