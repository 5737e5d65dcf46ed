"""The errors of Dockerfiles and `.dockerignore`: one module, so a caller knows where to find them."""

from __future__ import annotations
from forge.formats.errors import FormatError


class DockerfileError(FormatError):
    """A Dockerfile problem with a 1-based position: `Dockerfile:7:1: message`."""

    def __init__(self, message: str, line: int = 0, col: int = 0, filename: str = "Dockerfile"):
        super().__init__(message)
        self.message, self.line, self.col, self.filename = message, line, col, filename

    def __str__(self) -> str:
        if self.line:
            return f"{self.filename}:{self.line}:{self.col}: {self.message}"
        return f"{self.filename}: {self.message}"


class SubstitutionError(ValueError):
    """A bad `$` expression; the caller attaches the position."""
