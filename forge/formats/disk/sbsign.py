"""Signing EFI binaries for Secure Boot with sbsign (Debian's sbsigntool), reproducibly.

sbsign writes an Authenticode signature (PKCS#7, RSA PKCS#1 v1.5: deterministic) whose
signed attributes hold the signing time. It runs under faketime with the clock frozen at
SOURCE_DATE_EPOCH, so the same binary, key and epoch give the same signed bytes.
"""

from __future__ import annotations

import time
from pathlib import Path

from forge.formats.disk.errors import DiskImageError
from forge.formats.disk.tools import find_tool, run

__all__ = ["TOOLS", "sign", "tools", "check_key"]

TOOLS = ("sbsign", "faketime")


def tools() -> list[str]:
    """The host tools signing runs, for the cache key; DiskImageError names a missing one."""
    return sorted(str(find_tool(t)) for t in TOOLS)


def check_key(key: bytes, cert: bytes) -> None:
    """A PEM private key and a PEM certificate, or a DiskImageError saying which is wrong."""
    if b"PRIVATE KEY-----" not in key:
        raise DiskImageError("the Secure Boot key is not a PEM private key "
                             "(-----BEGIN PRIVATE KEY-----)")
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise DiskImageError("the Secure Boot certificate is not a PEM certificate "
                             "(-----BEGIN CERTIFICATE-----)")


def sign(binary: Path, out: Path, *, key: Path, cert: Path, epoch: int,
         env: dict[str, str]) -> Path:
    """Write `binary` signed with `key`/`cert` to `out` (which may be `binary`)."""
    check_key(Path(key).read_bytes(), Path(cert).read_bytes())
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))
    tmp = Path(out).with_name(Path(out).name + ".signed")
    # faketime -f without "@": an absolute time with the clock stopped, read as UTC.
    run([find_tool("faketime"), "-f", stamp, find_tool("sbsign"), "--key", key, "--cert", cert,
         "--output", tmp, binary], dict(env, TZ="UTC"))
    tmp.replace(out)
    return Path(out)
