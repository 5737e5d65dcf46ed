"""OpenPGP keyrings as apt uses them: which ones it trusts for a source, their keys.

A keyring is a file of OpenPGP packets (RFC 9580 section 4), binary (`.gpg`) or ASCII
armoured (`.asc`: apt accepts both in `trusted.gpg.d` and `signed-by`; gpgv reads only
binary, so armour is removed here, as apt does before calling gpgv). A keyring may also be
given as its bytes (deb822's `Signed-By:` may embed an armoured key block).

Keys are named by the fingerprints of their primary keys: a subkey signs only through its
binding by the primary key, so the primary fingerprints are what a keyring trusts. They are
computed here (v4: SHA-1, v5 and v6: SHA-256 of the key packet) rather than by asking gpg,
so that planning needs no gpg (only gpgv, which apt itself depends on) and gives the same
answer on every machine; the tests check them against `gpg --show-keys`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence, Union

from forge.formats.debian.errors import KeyringError
from forge.formats.debian.sources import Source

Keyring = Union[Path, bytes]  # a file, or the key material itself (an embedded Signed-By)

APT_ETC = Path("/etc/apt")
# What the debian-archive-keyring package installs: the keys of Debian's own archive.
DEBIAN_ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

_PUBLIC_KEY, _ARMOR = 6, b"-----BEGIN PGP PUBLIC KEY BLOCK-----"


def dearmor(data: bytes, where: str = "keyring") -> bytes:
    """Binary packets of `data`: armoured blocks decoded and joined, binary kept as is."""
    if _ARMOR not in data:
        if data[8:12] == b"KBXf":
            raise KeyringError(f"{where} is a GnuPG keybox, which apt and gpgv do not read as "
                               "a keyring; export it: gpg --export KEYID > key.gpg")
        return data
    out = b""
    for block in data.split(_ARMOR)[1:]:
        body = block.split(b"-----END PGP PUBLIC KEY BLOCK-----", 1)[0]
        lines = body.replace(b"\r", b"").split(b"\n")
        blank = lines.index(b"", 1) if b"" in lines[1:] else 0  # armour headers end at a blank line
        b64 = b"".join(l.strip() for l in lines[blank + 1:] if l.strip() and not l.startswith(b"="))
        try:
            out += base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise KeyringError(f"{where}: its armoured key block is not valid base64") from None
    return out


def _packets(data: bytes, where: str):
    """(tag, body) of each packet."""
    i = 0
    while i < len(data):
        b = data[i]
        if not b & 0x80:
            raise KeyringError(f"{where}: not an OpenPGP keyring (byte {i} starts no packet)")
        if b & 0x40:  # new format
            tag, o = b & 0x3F, data[i + 1] if i + 1 < len(data) else 0
            if o < 192:
                n, i = o, i + 2
            elif o < 224:
                n, i = ((o - 192) << 8) + data[i + 2] + 192, i + 3
            elif o == 255:
                n, i = int.from_bytes(data[i + 2:i + 6], "big"), i + 6
            else:
                raise KeyringError(f"{where}: partial packet lengths are not valid in a keyring")
        else:
            tag, kind = (b >> 2) & 0x0F, b & 3
            if kind == 3:
                n, i = len(data) - i - 1, i + 1
            else:
                w = (1, 2, 4)[kind]
                n, i = int.from_bytes(data[i + 1:i + 1 + w], "big"), i + 1 + w
        if i + n > len(data):
            raise KeyringError(f"{where}: truncated OpenPGP packet")
        yield tag, data[i:i + n]
        i += n


def fingerprints(data: bytes, where: str = "keyring") -> list[str]:
    """The primary-key fingerprints (upper-case hex) in a keyring's bytes, in file order."""
    out = []
    for tag, body in _packets(dearmor(data, where), where):
        if tag != _PUBLIC_KEY or not body:
            continue
        if body[0] == 4:
            out.append(hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).hexdigest())
        elif body[0] in (5, 6):
            prefix = b"\x9a" if body[0] == 5 else b"\x9b"
            out.append(hashlib.sha256(prefix + len(body).to_bytes(4, "big") + body).hexdigest())
        # v3 keys are obsolete and gpgv refuses them: they trust nothing
    return [f.upper() for f in out]


def load(keyrings: Sequence[Keyring], read: Callable[[Path], bytes] = Path.read_bytes) -> bytes:
    """All the keyrings as one binary keyring (gpgv's input); a missing file is an error."""
    out = b""
    for k in keyrings:
        where = "embedded Signed-By key" if isinstance(k, bytes) else str(k)
        try:
            data = k if isinstance(k, bytes) else read(Path(k))
        except OSError as e:
            raise KeyringError(f"cannot read keyring {k}: {e.strerror or e}") from None
        keys = dearmor(data, where)
        if not fingerprints(keys, where):
            raise KeyringError(f"{where} holds no OpenPGP public key")
        out += keys
    return out


def keyring_fingerprints(keyrings: Sequence[Keyring],
                         read: Callable[[Path], bytes] = Path.read_bytes) -> list[str]:
    """The sorted, distinct primary fingerprints of all the keyrings."""
    return sorted(set(fingerprints(load(keyrings, read))))


def apt_keyrings(mirror: str, suite: str, sources: Sequence[Source], *, etc: Path = APT_ETC,
                 archive_keyring: Path = DEBIAN_ARCHIVE_KEYRING,
                 listdir: Callable[[Path], list[str]] = os.listdir) -> list[Keyring]:
    """What apt trusts for `suite` of `mirror`: the `signed-by` of the sources entry that
    names them, else every keyring apt trusts by default (`trusted.gpg`, the `.gpg` and
    `.asc` files of `trusted.gpg.d`) plus Debian's archive keyring, where they exist."""
    for s in sources:
        if s.uri.rstrip("/") == mirror.rstrip("/") and suite in s.suites and s.signed_by:
            return [x.encode() if "BEGIN PGP" in x else Path(x) for x in s.signed_by]
    def present(p: Path) -> bool:  # through listdir, so that a caller sees every look
        try:
            return p.name in listdir(p.parent)
        except OSError:
            return False

    parts = etc / "trusted.gpg.d"
    names = sorted(listdir(parts)) if present(parts) else []
    candidates = [etc / "trusted.gpg"] + [parts / n for n in names if n.endswith((".gpg", ".asc"))]
    return list(dict.fromkeys(p for p in candidates + [archive_keyring] if present(p)))
