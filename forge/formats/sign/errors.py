"""The errors of the signature domain: one base, `SignError`."""

from __future__ import annotations

from forge.formats.errors import FormatError


class SignError(FormatError):
    """A key, an envelope or a Statement that cannot be used; the message says why."""


class KeyFileError(SignError):
    """A key file that is missing, unreadable, encrypted or of a type forge does not sign with."""


class EnvelopeError(SignError):
    """A DSSE envelope that is not one (bad JSON, missing fields, bad base64)."""


class BadSignatureError(SignError):
    """No signature of the envelope verifies with the key given."""


class SubjectMismatchError(SignError):
    """The signed Statement names other bytes than the artifact checked."""
