"""The errors of Debian packages, indexes and sources: one module, so a caller knows where to find them."""

from __future__ import annotations


class DebError(Exception):
    """A package or index is malformed, missing, or does not match its digest."""
