"""Compression sniffing and streaming decompression (what a download hashes its diff_id with)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os

import pytest

from forge.formats.common.compression import (CompressionError, StreamDecompressor,
                                              compression_of, open_decompressed)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_compression_is_sniffed_from_the_first_bytes():
    assert compression_of(gzip.compress(b"x")) == "gzip"
    assert compression_of(b"\x28\xb5\x2f\xfd....") == "zstd"
    assert compression_of(b"ustar") == "none"
    assert open_decompressed(io.BytesIO(gzip.compress(b"abc"))).read() == b"abc"
    assert open_decompressed(io.BytesIO(b"plain")).read() == b"plain"


def test_stream_decompressor_handles_members_padding_and_plain_tar():
    tar = os.urandom(3000) + b"\0" * (8 << 20)  # big and very compressible: bounded output

    def diff_id(blob: bytes, chunk: int) -> str:
        d, h = StreamDecompressor("layer sha256:x"), hashlib.sha256()
        for i in range(0, len(blob), chunk):
            for piece in d.feed(blob[i:i + chunk]):
                h.update(piece)
        for piece in d.finish():
            h.update(piece)
        return "sha256:" + h.hexdigest()
    two_members = gzip.compress(tar[:5000]) + gzip.compress(tar[5000:]) + b"\0" * 512
    for blob in (gzip.compress(tar), two_members, tar, b"ab"):
        expect = sha(b"ab") if blob == b"ab" else sha(tar)
        assert diff_id(blob, 3) == expect if len(blob) < 100 else diff_id(blob, 65536) == expect
    with pytest.raises(CompressionError, match="gzip stream is truncated"):
        diff_id(gzip.compress(tar)[:-100], 4096)
