"""The errors of the image domain: one base, so `except ImageError` catches them all."""

from __future__ import annotations

from forge.formats.errors import FormatError
from forge.formats.common.treepath import UnsafePathError


class ImageError(FormatError):
    """Something about an OCI image, its layout, a layer or a reference is wrong."""


class LayoutError(ImageError):
    """An image layout or archive is missing something, or a blob does not match."""


class InvalidDigestError(LayoutError, ValueError):
    """A digest that is not `sha256:<64 hex>` or `sha512:<128 hex>`, so cannot name a blob."""


class InvalidReferenceError(ImageError, ValueError):
    """A text that is not a valid image reference."""


class LayerError(LayoutError):
    """A layer's bytes are not a tar archive forge can read (cut short, corrupt)."""


class UnsafeLayerError(ImageError, UnsafePathError):
    """A layer member would escape the destination or cannot be applied safely.

    Path escapes found by `forge.formats.common.treepath` are its base `UnsafePathError`:
    catch that to catch both.
    """
