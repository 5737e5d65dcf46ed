"""The errors of the registry client: one base, `RegistryError`, whose message says what
failed, why, and how to fix it. Problems with a local image layout are the image
domain's `LayoutError`, not these.
"""

from __future__ import annotations
from forge.formats.errors import FormatError


class RegistryError(FormatError):
    """Any failure talking to a registry; the message says what, why and how to fix it."""


class RegistryUnavailableError(RegistryError):
    """The registry could not be reached, or kept failing with 5xx answers."""


class RegistryAuthError(RegistryError):
    """Missing or refused credentials (401/403), or a credential helper that failed."""


class NotFoundError(RegistryError):
    """The registry answered 404 for a manifest, a blob or the repository."""


class VerificationError(RegistryError):
    """Content that does not match its digest, size or diff_id, or a truncated transfer."""


class UnsupportedError(RegistryError):
    """A manifest or layer this client cannot handle (schema 1, a nested index)."""


class PlatformNotFoundError(RegistryError):
    """An index that has no manifest for the requested platform."""
