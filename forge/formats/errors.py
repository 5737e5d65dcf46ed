"""The one base of every formats domain's errors.

A format error means the input was refused: bytes from a user, a file or a server that
the format's rules do not allow (a `../` member, a digest that does not match, a broken
index). That is bad input, not a bug in forge, so the engine reports an action or a rule
that raises one as a failure of that action or target (exit 1, its message, no
traceback), wherever the rule forgot to catch it.
"""

from __future__ import annotations


class FormatError(Exception):
    """Input that a format refuses; the message says what and where."""
