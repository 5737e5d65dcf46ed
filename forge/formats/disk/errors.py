"""The errors of disk images: one module, so a caller knows where to find them."""

from __future__ import annotations
from forge.formats.errors import FormatError


class DiskImageError(FormatError):
    """A tool or a data file is missing, a tool failed, or the inputs cannot be imaged."""
