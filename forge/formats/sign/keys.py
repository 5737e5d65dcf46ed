"""Signing keys: ECDSA P-256 (signatures DER-encoded, over SHA-256) and Ed25519, stored as
PEM (PKCS#8 for private keys, SubjectPublicKeyInfo for public ones). `forge keygen` writes
them unencrypted: the file's mode (0600) protects it, as with ssh keys; an encrypted key
(from openssl) is read when its password is given.

A key's id is the sha256 of its public key's DER SubjectPublicKeyInfo, in hex: the same for
the private key and its .pub, whichever program computes it. DSSE envelopes carry it as a
hint (`keyid`) so a verifier holding several keys picks the right one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from forge.formats.sign.errors import KeyFileError

KEY_TYPES = ("ecdsa", "ed25519")


def _kind(key) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeyFileError(f"ECDSA key on curve {key.curve.name}: forge signs with P-256 "
                               "(secp256r1) only; make one with `forge keygen --type ecdsa`")
        return "ecdsa"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    raise KeyFileError(f"a {type(key).__name__.removeprefix('_')} key: forge signs with ECDSA "
                       "P-256 or Ed25519 keys; make one with `forge keygen`")


@dataclass(frozen=True)
class PublicKey:
    key: object
    kind: str  # "ecdsa" | "ed25519"

    @property
    def der(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def pem(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def keyid(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            if self.kind == "ecdsa":
                self.key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            else:
                self.key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class PrivateKey:
    key: object
    kind: str

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key(), self.kind)

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, data: bytes) -> bytes:
        if self.kind == "ecdsa":
            return self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        return self.key.sign(data)

    @property
    def pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def generate(kind: str = "ecdsa") -> PrivateKey:
    if kind == "ecdsa":
        return PrivateKey(ec.generate_private_key(ec.SECP256R1()), "ecdsa")
    if kind == "ed25519":
        return PrivateKey(ed25519.Ed25519PrivateKey.generate(), "ed25519")
    raise KeyFileError(f"unknown key type {kind!r}: use one of {', '.join(KEY_TYPES)}")


def _read(path: Path, what: str, shown=None) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read the {what} {shown or path}: {e.strerror or e}") from None


def load_private(path: Path, shown: Path | str | None = None,
                 password: bytes | None = None) -> PrivateKey:
    """`shown`: how messages name the file (default `path`); `password`: an encrypted key's."""
    data = _read(path, "signing key", shown)
    path = shown or path
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise KeyFileError(f"{path} is a public key: signing needs the private key "
                           f"(the file without .pub)")
    try:
        key = serialization.load_pem_private_key(data, password=password or None)
    except TypeError:
        raise KeyFileError(f"{path} is an encrypted private key and no password was given: "
                           "set FORGE_SIGN_PASSWORD, or use a key `forge keygen` made "
                           "(unencrypted, mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        if password and b"ENCRYPTED" in data:
            raise KeyFileError(f"{path}: the password does not decrypt it (FORGE_SIGN_PASSWORD)") from None
        raise KeyFileError(f"{path} is not a PEM private key ({e}): make one with "
                           "`forge keygen`") from None
    return PrivateKey(key, _kind(key))


def load_public(path: Path) -> PublicKey:
    """A public key from a PEM file; a private key's file gives its public half."""
    data = _read(path, "public key")
    if b"PRIVATE KEY-----" in data:
        return load_private(path).public
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path} is not a PEM public key ({e}): use the .pub file "
                           "`forge keygen` wrote") from None
    return PublicKey(key, _kind(key))
