"""The errors of Debian packages, indexes, sources and keyrings: one module, so a caller
knows where to find them.

The failures of authenticating a suite are `ReleaseError`s, one class per reason, each
carrying the suite, the mirror and the signer (a key ID or fingerprint, or "unsigned"), so
a caller can add its own advice on how to name another keyring."""

from __future__ import annotations
from forge.formats.errors import FormatError


class DebError(FormatError):
    """A package or index is malformed, missing, or does not match its digest."""


class DigestMismatchError(DebError):
    """A file from a mirror is not the one the verified Release (or the index) names."""


class MirrorError(DebError):
    """A mirror that cannot be reached, stalls, or answers with an error status."""


class KeyringError(DebError):
    """A keyring file cannot be read as OpenPGP public keys."""


class ReleaseError(DebError):
    """A suite's Release file cannot be trusted; nothing from the suite may be used."""

    def __init__(self, message: str, *, suite: str = "", mirror: str = "",
                 signer: str = "unsigned"):
        super().__init__(message)
        self.suite, self.mirror, self.signer = suite, mirror, signer


class UnsignedReleaseError(ReleaseError):
    """Neither InRelease nor Release.gpg holds a signature."""


class UnknownKeyError(ReleaseError):
    """Signed, but only by keys that no trusted keyring holds."""


class BadSignatureError(ReleaseError):
    """A signature does not match the signed text: the file was altered."""


class WorthlessSignatureError(ReleaseError):
    """Signed by a trusted key that has expired or been revoked, or with a weak digest."""


class ExpiredReleaseError(ReleaseError):
    """The Release's Valid-Until is past: an old, replayed answer."""


class FutureReleaseError(ReleaseError):
    """The Release's Date is later than now (beyond the tolerated clock skew)."""


class WrongSuiteError(ReleaseError):
    """A validly signed Release of another suite was served for this one."""


class GpgvError(ReleaseError):
    """gpgv is missing or failed without saying why in its status output."""
