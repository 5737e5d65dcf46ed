"""Errors and how they are shown to users.

Every error a user can cause is a `ForgeError` carrying an exit code (Bazel's),
an optional source location and an optional hint. Locations are attached at the
boundaries (the loader, the analysis of one target, the executor); the CLI is
the only place that formats and prints them.
"""

from __future__ import annotations

import difflib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

EXIT_OK = 0
EXIT_BUILD_FAILED = 1
EXIT_USAGE = 2  # bad command line, BUILD file or configuration
EXIT_TESTS_FAILED = 3
EXIT_INTERRUPTED = 8
EXIT_INTERNAL = 37  # a bug in forge or a rule (Bazel uses the same code)


@dataclass(frozen=True)
class Location:
    """A place in a user's file; `line` and `col` count from 1 (0 = unknown)."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}:{self.col or 1}"


class ForgeError(Exception):
    """A user-facing error: what went wrong, where, and how to fix it."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, location: Location | None = None,
                 hint: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.location = location
        self.hint = hint
        self.detail = detail  # pre-formatted text shown after the snippet

    def with_location(self, location: Location | None) -> "ForgeError":
        if self.location is None and location is not None:
            self.location = location
        return self


class UsageError(ForgeError):
    """Bad command line."""


class LoadError(ForgeError):
    """A BUILD, .bzl or configuration file is wrong."""


class AnalysisError(ForgeError):
    """A target's attributes cannot be turned into actions."""


class ActionFailed(ForgeError):
    """Raised by an in-process step whose work failed (e.g. a checksum mismatch)."""

    exit_code = EXIT_BUILD_FAILED


class BuildFailedError(ForgeError):
    exit_code = EXIT_BUILD_FAILED


class TestsFailedError(ForgeError):
    exit_code = EXIT_TESTS_FAILED


class BuildInterrupted(ForgeError):
    exit_code = EXIT_INTERRUPTED


class DiskFullError(ForgeError):
    """A filesystem forge writes to (the cache, forge-out/) has no room left."""

    exit_code = EXIT_BUILD_FAILED


_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException) -> bool:
    """An OSError for a full filesystem or quota, or SQLite's word for it."""
    if isinstance(e, OSError):
        return e.errno in _FULL
    return type(e).__name__ in ("OperationalError", "DatabaseError") and "full" in str(e)


def full_path(e: BaseException, default: Path) -> Path:
    """The directory whose filesystem `e` (a disk-full error) found full: the file it was
    writing (a copy's destination), else `default`."""
    name = getattr(e, "filename2", None) or getattr(e, "filename", None)
    return Path(name).parent if name else default


def free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_full(path: Path, *, needed: int | None = None, what: str = "") -> DiskFullError:
    """The error for a full filesystem at `path`: where, how much is free, how much more
    was wanted (when known), and how to make room."""
    free = free_bytes(path)
    said = f"no space left on the filesystem of {path}"
    if what:
        said = f"{what}: {said}"
    if free is not None:
        said += f" ({human_size(free)} free"
        said += f", {human_size(needed)} needed)" if needed else ")"
    elif needed:
        said += f" ({human_size(needed)} needed)"
    return DiskFullError(said, hint="make room there (`forge cache gc --max-size 5G` trims the "
                         "cache), or build with a cache on a larger filesystem (--cache-dir, "
                         "FORGE_CACHE_DIR, [cache] dir in forge.toml); then build again: "
                         "nothing half-written was kept")


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def did_you_mean(word: str, candidates) -> str | None:
    """A hint naming the closest candidates, or None."""
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=3, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(repr(c) for c in close) + "?"


def _snippet(location: Location, root: Path | None) -> str:
    path = Path(location.file)
    if root is not None and not path.is_absolute():
        path = root / path
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    n = location.line
    if not 1 <= n <= len(lines):
        return ""
    out = []
    width = len(str(n))
    if n >= 2:
        out.append(f"   {str(n - 1).rjust(width)} | {lines[n - 2]}")
    out.append(f">> {str(n).rjust(width)} | {lines[n - 1]}")
    return "\n".join(out)


def format_error(err: ForgeError, root: Path | None = None) -> str:
    """The STYLE.md form: `file:line:col: error: what`, a snippet, then a hint."""
    head = f"{err.location}: error: {err.message}" if err.location else f"error: {err.message}"
    parts = [head]
    if err.location and err.location.line:
        snippet = _snippet(err.location, root)
        if snippet:
            parts.append(snippet)
    if err.detail:
        parts.append(err.detail.rstrip())
    if err.hint:
        parts.append(f"hint: {err.hint}")
    return "\n".join(parts)
