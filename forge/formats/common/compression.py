"""Compressed streams told apart by their first bytes, as tar, Docker and the kernel do.

gzip (RFC 1952, `1f 8b`) and zstd (RFC 8878: a frame `28 b5 2f fd`, or a skippable
frame `5? 2a 4d 18`, which `pzstd` writes first) are recognised; anything else is taken
as plain. Both formats make a stream of members (gzip) or frames (zstd) one after
another, and real tools write such streams: `pigz`, `cat a.gz b.gz`, `pzstd`, `zstd` on
several inputs. So a stream is decoded member after member to its very end, and one
that stops inside a member is an error, never a short read that a later digest check
would blame on the content. NUL bytes between or after gzip members are skipped, as
gzip does (tape padding); zstd allows nothing but frames. Windows up to the format's
maximum (`zstd --long=31`) are accepted.

zstd comes from the `zstandard` module, a dependency of forge (`pyproject.toml`); the
same module compresses, so `compressor_id` names what wrote a compressed output for the
keys of the actions that compress.
"""

from __future__ import annotations

import io
import zlib
from typing import BinaryIO, Iterator

import zstandard

from forge.formats.errors import FormatError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SKIPPABLE = b"\x2a\x4d\x18"  # bytes 1-3 of a skippable frame's magic 0x184D2A5?
_CHUNK = 1 << 20
_ZSTD_IN = 1 << 17  # input per zstd call: bounds the output one call can make
_GZIP_OUT = 1 << 22
_ZSTD = zstandard.ZstdDecompressor(max_window_size=1 << zstandard.WINDOWLOG_MAX)


class CompressionError(FormatError):
    """A stream cannot be decompressed: it is corrupt or cut short."""


def compression_of(head: bytes) -> str:
    """`gzip`, `zstd` or `none`, from the first (four) bytes of a blob."""
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC or (len(head) >= 4 and head[0] >> 4 == 5 and head[1:4] == _SKIPPABLE):
        return "zstd"
    return "none"


def compressor_id(method: str) -> str:
    """Which library and version writes `method` (`gzip`, `zstd`, `none`) here: what an
    action that compresses puts in its key, so another compressor's bytes are not
    served for it from the cache."""
    if method == "gzip":
        return f"zlib {zlib.ZLIB_RUNTIME_VERSION}"
    if method == "zstd":
        return f"zstandard {zstandard.__version__} (libzstd {zstandard.ZSTD_VERSION})"
    if method == "none":
        return "none"
    raise ValueError(f"unknown compression {method!r} (gzip, zstd or none)")


def compressor_mismatch(planned: str, method: str) -> str | None:
    """Why an action whose key names `planned` (a `compressor_id`) must not run here, or
    None: its output would be another compressor's bytes under that key."""
    here = compressor_id(method)
    if planned == here:
        return None
    return f"this step was planned to compress with {planned}, but {here} is installed"


def zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """The one zstd setting forge writes with: one thread (several would frame the output
    by the host's cores) and a checksum, so the bytes depend only on the input, the level
    and `compressor_id`."""
    return zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0)


class _Members:
    """Push decoding of member after member (gzip) or frame after frame (zstd)."""

    def __init__(self, kind: str, what: str):
        self.kind, self.what = kind, what
        self.d = None  # the current member's decompressor; None between members

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            while data:
                if self.d is None:
                    if self.kind == "gzip":
                        data = data.lstrip(b"\0")
                        if not data:
                            return
                        self.d = zlib.decompressobj(31)
                    else:
                        self.d = _ZSTD.decompressobj()
                if self.kind == "gzip":
                    piece = self.d.decompress(data, _GZIP_OUT)
                    data = self.d.unconsumed_tail
                else:
                    piece = self.d.decompress(data[:_ZSTD_IN])
                    data = data[_ZSTD_IN:]
                if piece:
                    yield piece
                if self.d.eof:
                    data = self.d.unused_data + data
                    self.d = None
        except (zlib.error, zstandard.ZstdError) as e:
            raise CompressionError(f"{self.what}: corrupt {self.kind} data ({e})") from None

    def finish(self) -> Iterator[bytes]:
        if self.d is not None:
            raise CompressionError(f"{self.what}: the {self.kind} stream is truncated")
        return iter(())


class _Decoded(io.RawIOBase):
    """The pull side: a readable stream of a compressed stream's uncompressed bytes."""

    def __init__(self, src: BinaryIO, kind: str, what: str, head: bytes):
        self._src, self._dec = src, _Members(kind, what)
        self._pieces = self._dec.feed(head) if head else None
        self._buf, self._pos, self._done = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos >= len(self._buf):
            if self._pieces is not None:
                self._buf, self._pos = memoryview(next(self._pieces, b"")), 0
                if not self._buf:
                    self._pieces = None
                continue
            if self._done:
                return 0
            chunk = self._src.read(_CHUNK)
            if chunk:
                self._pieces = self._dec.feed(chunk)
            else:
                self._done = True
                self._pieces = self._dec.finish()
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        return n


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
    """A readable stream of `fileobj`'s uncompressed bytes (gzip, zstd or plain). Reading
    it raises CompressionError, naming `what`, for corrupt or truncated input."""
    head = fileobj.read(4)
    kind = compression_of(head)
    if kind == "none":
        if fileobj.seekable():
            fileobj.seek(-len(head), io.SEEK_CUR)
            return fileobj
        return io.BufferedReader(_Prefixed(head, fileobj))
    return io.BufferedReader(_Decoded(fileobj, kind, what, head), _CHUNK)


class StreamDecompressor:
    """Push-style decompression of a stream arriving in chunks (a download), to hash its
    uncompressed bytes on the way: `feed` each chunk, then `finish`; both yield output."""

    def __init__(self, what: str):
        self.what, self.kind, self.d, self.head = what, None, None, b""

    def _start(self, head: bytes) -> None:
        self.kind = compression_of(head)
        if self.kind != "none":
            self.d = _Members(self.kind, self.what)

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if self.kind is None:
            self.head += chunk
            if len(self.head) < 4:
                return
            self._start(self.head)
            chunk, self.head = self.head, b""
        if self.d is None:
            yield chunk
        else:
            yield from self.d.feed(chunk)

    def finish(self) -> Iterator[bytes]:
        if self.kind is None and self.head:
            head, self.head = self.head, b""
            self._start(head)
            yield from self.feed(head)
        if self.d is not None:
            yield from self.d.finish()
