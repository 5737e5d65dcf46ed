"""Blob handling for the registry client: streaming decompression that checks a layer's
uncompressed digest (its diff_id) as it downloads, platform selection from an index,
and writing a pulled layout atomically.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import zlib
from pathlib import Path

from forge.formats.registry_auth import (LayoutError, PlatformNotFoundError, UnsupportedError,
                                         VerificationError)


def _sha(data: bytes, algo: str = "sha256") -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def _split_digest(digest: str) -> tuple[str, str]:
    algo, _, hexpart = digest.partition(":")
    if algo not in ("sha256", "sha512") or not re.fullmatch(r"[0-9a-f]+", hexpart or "-"):
        raise UnsupportedError(f"digest {digest!r} is not supported: expected sha256:<hex> "
                               "(or sha512:<hex>)")
    return algo, hexpart

class _Decompressor:
    """Streams a layer through gzip/zstd (sniffed from magic bytes) to hash its diff_id."""

    def __init__(self, digest: str):
        self.digest, self.kind, self.d, self.head = digest, None, None, b""

    def _start(self, head: bytes) -> None:
        if head[:2] == b"\x1f\x8b":
            self.kind, self.d = "gzip", zlib.decompressobj(31)
        elif head[:4] == b"\x28\xb5\x2f\xfd":
            try:
                import zstandard
            except ImportError:
                raise UnsupportedError(
                    f"layer {self.digest} is zstd-compressed and the Python module 'zstandard' "
                    "is not installed: pip install zstandard") from None
            self.kind = "zstd"
            self.d = zstandard.ZstdDecompressor().decompressobj()
        else:
            self.kind = "tar"

    def feed(self, chunk: bytes):
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

    def finish(self):
        if self.kind is None and self.head:
            head, self.head = self.head, b""
            self._start(head)
            yield from self.feed(head)
        if self.kind == "gzip" and not self.d.eof:
            raise VerificationError(f"layer {self.digest}: the gzip stream is truncated")


def _select_platform(manifests: list[dict], platform: str, what: str, host: str) -> dict:
    want = platform.split("/")
    if len(want) not in (2, 3) or not all(want):
        raise PlatformNotFoundError(f"platform {platform!r} is not os/architecture[/variant], "
                                    "e.g. linux/amd64 or linux/arm/v7")
    os_, arch, variant = want[0], want[1], want[2] if len(want) == 3 else None

    def norm(v, a):
        return None if a == "arm64" and v == "v8" else v
    found = []
    for d in manifests:
        p = d.get("platform") or {}
        if p.get("os") == os_ and p.get("architecture") == arch:
            if variant is None or norm(p.get("variant"), arch) == norm(variant, arch):
                found.append(d)
    if not found:
        have = sorted({"/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant"))
                                if x)
                       for p in (d.get("platform") or {} for d in manifests)} - {""})
        raise PlatformNotFoundError(f"{what} from {host} is an index without a {platform} image;"
                                    f" it has: {', '.join(have) or 'no platforms'}; pass one "
                                    "of those as the platform")
    found.sort(key=lambda d: (d.get("platform") or {}).get("variant") is not None)
    return found[0]


def _write_blob(layout: Path, digest: str, data: bytes) -> None:
    path = layout / "blobs" / Path(*_split_digest(digest))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _read_blob(layout: Path, desc: dict) -> bytes:
    try:
        digest = desc["digest"]
        data = (layout / "blobs" / Path(*_split_digest(digest))).read_bytes()
    except (KeyError, TypeError, OSError) as e:
        raise LayoutError(f"{layout}: cannot read the manifest a descriptor points to ({e}): the "
                          "layout is incomplete") from None
    if _sha(data, _split_digest(digest)[0]) != digest:
        raise LayoutError(f"{layout}: blob {digest} does not hash to its name: the layout is "
                          "corrupt")
    return data


def _install(tmp: Path, dest: Path) -> None:
    """Move a complete layout into place, replacing an older layout there."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        old.rmdir()
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)
