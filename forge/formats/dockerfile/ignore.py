"""`.dockerignore`: which files of a build context Docker leaves out.

Format, as Docker (moby/patternmatcher) reads it: one pattern a line. A line whose first
character is `#` is a comment (an indented `#` is a pattern); surrounding whitespace is
trimmed and blank lines are skipped. A leading `!` makes an exception that re-includes
what earlier patterns excluded. Each pattern is cleaned like Go's `filepath.Clean`
(`a//b/../c/` -> `a/c`) and a leading `/` is dropped: patterns are always relative to the
context root. Matching follows Go's `filepath.Match` (`*` and `?` never cross `/`,
`[a-z]`/`[^a-z]` classes, `\\` escapes) plus `**`, which matches any number of directories
including none. A pattern that matches a directory also matches everything beneath it.
The last pattern that matches a path decides, so `*.md` then `!README.md` keeps README.md.

What forge chose about Docker's special files: Docker always sends the Dockerfile and
`.dockerignore` to the builder, but COPY/ADD do not see them when they are ignored. Here
`matches()`/`filter()` report the patterns' verdict only; the caller reads the Dockerfile
itself whatever the patterns say, which gives the same result. A `<Dockerfile>.dockerignore`
next to the Dockerfile, when present, replaces the context's `.dockerignore` (Docker's
rule); choosing which file to read is the caller's job.
"""

from __future__ import annotations

import posixpath
import re
from typing import Iterable

from forge.formats.dockerfile.errors import DockerfileError


def _clean(path: str) -> str:
    """Go's filepath.Clean for slash-separated paths."""
    cleaned = posixpath.normpath(path) if path else "."
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def _compile(pattern: str) -> re.Pattern:
    out, i = ["^"], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("*", i + 1):
                i += 1
                if pattern.startswith("/", i + 1):
                    i += 1
                out.append(".*" if i + 1 >= len(pattern) else "(.*/)?")
            else:
                out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\":
            i += 1
            out.append(re.escape(pattern[i]) if i < len(pattern) else "\\\\")
        elif ch == "[":
            end = pattern.find("]", i + 2 if pattern.startswith("^", i + 1) else i + 1)
            if end < 0:
                raise ValueError(f"bad .dockerignore pattern '{pattern}': unterminated '['")
            body = pattern[i + 1:end]
            neg = body.startswith("^")
            body = "".join("\\" + c if c in "[&~|" else c for c in body[neg:])
            out.append(("[^" if neg else "[") + body + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + "$", re.S)


class DockerIgnore:
    """Parsed `.dockerignore` patterns; `patterns` is a list of (is_exception, pattern)."""

    def __init__(self, text: str = ""):
        self.patterns: list[tuple[bool, str]] = []
        self._compiled: list[tuple[bool, re.Pattern]] = []
        for n, line in enumerate(text.lstrip("\ufeff").splitlines(), 1):
            if line.startswith("#"):
                continue
            line = line.strip()
            if not line:
                continue
            exception = line.startswith("!")
            if exception:
                line = line[1:].strip()
            if line:
                line = _clean(line)
                if len(line) > 1 and line.startswith("/"):
                    line = line[1:]
            try:
                self._compiled.append((exception, _compile(line)))
            except (ValueError, re.error) as e:  # re.error: a class like [z-a]
                raise DockerfileError(f"bad pattern {line!r}: {e}" if isinstance(e, re.error)
                                      else str(e), n, 1, ".dockerignore") from None
            self.patterns.append((exception, line))

    def matches(self, path: str) -> bool:
        """True when `path` (relative to the context; `/` separators) is ignored."""
        path = _clean(path).lstrip("/")
        if path.startswith("./"):
            path = path[2:]
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        matched = False
        for exception, rx in self._compiled:
            if exception != matched:  # only an exception can undo a match, and vice versa
                continue
            if rx.match(path) or any(rx.match(p) for p in prefixes):
                matched = not exception
        return matched

    def filter(self, paths: Iterable[str]) -> list[str]:
        """The paths that are sent, in their original order."""
        return [p for p in paths if not self.matches(p)]
