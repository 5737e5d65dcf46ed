"""Compressed streams written by the real tools, as registries, Debian and kernels get them:
several gzip members or zstd frames each. Every test of a decoding path takes these."""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

from conftest import require

# name -> the shell command that writes it from the files a and b (the tar split in two)
# and whole (the tar); {-} marks which need pigz or pzstd.
COMMANDS = {
    "zstd-two-frames": "zstd -q -c a b",                     # zstd on several inputs
    "zstd-cat": "zstd -q -c a > a.zst && zstd -q -c b > b.zst && cat a.zst b.zst",
    "zstd-T2-long": "zstd -q -T2 --long -c whole",
    "zstd-long31": "zstd -q --long=31 -c whole",             # a 2 GiB window
    "pzstd": "pzstd -1 -q -p 2 -c whole",                    # skippable frames between frames
    "gzip-cat": "gzip -n -c a > a.gz && gzip -n -c b > b.gz && cat a.gz b.gz",
    "pigz": "pigz -n -p 2 -b 128 -c whole",
    "pigz-cat": "pigz -n -c a > a.gz && pigz -n -c b > b.gz && cat a.gz b.gz",
}


def big_tar(files: int = 48, size: int = 1 << 17, seed: int = 7) -> bytes:
    """A tar of about 6 MiB (pzstd -1 cuts a frame per 1.5 MiB or so), half compressible."""
    rnd, buf = random.Random(seed), io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(files):
            data = rnd.randbytes(size // 2) + bytes([i]) * (size // 2)
            info = tarfile.TarInfo(f"d{i % 4}/f{i:03d}")
            info.size, info.mtime = len(data), 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compressed_by_tools(data: bytes, work: Path) -> dict[str, bytes]:
    """`data` compressed by every command of COMMANDS (each asserted to make several
    members or frames, except single-member pigz)."""
    for tool in ("zstd", "pzstd", "gzip", "pigz"):
        require(shutil.which(tool) is not None,
                f"{tool} is not installed (apt-get install zstd pigz; see dev/setup.sh)")
    work.mkdir(parents=True, exist_ok=True)
    (work / "whole").write_bytes(data)
    (work / "a").write_bytes(data[:len(data) // 3])
    (work / "b").write_bytes(data[len(data) // 3:])
    out = {}
    for name, cmd in COMMANDS.items():
        p = subprocess.run(["bash", "-c", cmd], cwd=work, capture_output=True, check=True)
        out[name] = p.stdout
    return out


def zstd_frames(blob: bytes) -> int:
    """How many frames (skippable ones included) a zstd stream has."""
    import zstandard
    n = i = 0
    while i < len(blob):
        d = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
        d.decompress(blob[i:])
        i, n = len(blob) - len(d.unused_data), n + 1
    return n
