"""Compression sniffing and streaming decompression (what a download hashes its diff_id with)."""

from __future__ import annotations

import gzip
import zlib
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


# ---- streams written by the real tools ---------------------------------------------

@pytest.fixture(scope="module")
def tool_streams(tmp_path_factory):
    from compressed_streams import big_tar, compressed_by_tools
    data = big_tar()
    return data, compressed_by_tools(data, tmp_path_factory.mktemp("streams"))


class _Pipe(io.RawIOBase):
    """A non-seekable source that hands out odd-sized pieces, as a socket does."""

    def __init__(self, data: bytes, step: int):
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.step, len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def _pushed(blob: bytes, chunk: int) -> bytes:
    d, out = StreamDecompressor("layer sha256:x"), []
    for i in range(0, len(blob), chunk):
        out += d.feed(blob[i:i + chunk])
    out += d.finish()
    return b"".join(out)


def test_the_tools_write_several_members_or_frames(tool_streams):
    from compressed_streams import zstd_frames
    _, blobs = tool_streams
    assert zstd_frames(blobs["zstd-two-frames"]) == 2 == zstd_frames(blobs["zstd-cat"])
    assert zstd_frames(blobs["pzstd"]) >= 6  # skippable frame, frame, skippable, frame, ...
    assert blobs["pzstd"][:4] == b"\x50\x2a\x4d\x18"
    for name in ("gzip-cat", "pigz-cat"):
        first = zlib.decompressobj(31)
        first.decompress(blobs[name])
        assert first.eof and first.unused_data.startswith(b"\x1f\x8b"), name


@pytest.mark.parametrize("name", list(__import__("compressed_streams").COMMANDS))
def test_every_tool_stream_decodes_completely_on_every_path(tool_streams, name):
    data, blobs = tool_streams
    blob = blobs[name]
    assert compression_of(blob[:4]) == ("zstd" if name.startswith(("zstd", "pzstd")) else "gzip")
    assert sha(open_decompressed(io.BytesIO(blob)).read()) == sha(data)  # seekable
    piped = open_decompressed(_Pipe(blob, 4093))
    got = b"".join(iter(lambda: piped.read(65536), b""))
    assert sha(got) == sha(data)
    for chunk in (1 << 20, 65521):
        assert sha(_pushed(blob, chunk)) == sha(data)


@pytest.mark.parametrize("name", ["zstd-two-frames", "pzstd", "gzip-cat", "pigz"])
def test_a_stream_cut_anywhere_is_an_error_not_a_short_read(tool_streams, name):
    _, blobs = tool_streams
    blob = blobs[name]
    for cut in (len(blob) - 1, len(blob) * 2 // 3, 9):
        with pytest.raises(CompressionError, match="truncated|corrupt"):
            open_decompressed(io.BytesIO(blob[:cut]), "the layer").read()
        with pytest.raises(CompressionError, match="truncated|corrupt"):
            _pushed(blob[:cut], 65536)


def test_garbage_after_the_last_frame_is_an_error(tool_streams):
    _, blobs = tool_streams
    with pytest.raises(CompressionError, match="corrupt zstd"):
        open_decompressed(io.BytesIO(blobs["zstd-two-frames"] + b"junk")).read()
    with pytest.raises(CompressionError, match="corrupt gzip"):
        _pushed(blobs["gzip-cat"] + b"junk", 4096)
    # NUL padding after gzip members is what tape blocking leaves: gzip skips it
    assert open_decompressed(io.BytesIO(blobs["gzip-cat"] + b"\0" * 1000)).read()[:3]


def test_forge_zstd_bytes_are_the_same_in_every_process(tmp_path):
    """An initrd segment's zstd bytes come from the zstandard module only: the same with
    or without the zstd command on PATH, and what the zstd command decodes."""
    import subprocess
    import sys
    data = os.urandom(1 << 16) * 40
    (tmp_path / "in").write_bytes(data)
    prog = ("import sys; from forge.formats.linux.cpio import compress; "
            "compress(open(sys.argv[1], 'rb'), open(sys.argv[2], 'wb'), 'zstd', 19)")
    outs = []
    for n, path in enumerate(("/usr/bin:/bin", "/nonexistent")):
        out = tmp_path / f"out{n}"
        subprocess.run([sys.executable, "-c", prog, str(tmp_path / "in"), str(out)], check=True,
                       env={"PATH": path, "ZSTD_CLEVEL": "1", "ZSTD_NBTHREADS": "2"})
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    from conftest import require
    import shutil
    require(shutil.which("zstd") is not None, "zstd is not installed (apt-get install zstd)")
    p = subprocess.run(["zstd", "-dc", str(tmp_path / "out0")], capture_output=True, check=True)
    assert p.stdout == data
