"""The errors of LinuxKit assemblies: one module, so a caller knows where to find them."""

from __future__ import annotations

from dataclasses import dataclass
from forge.formats.errors import FormatError


class AssemblyError(FormatError):
    """A problem in an assembly: `file.yml:7:5: message`, with `hint` saying how to fix it."""

    def __init__(self, message: str, where: "Loc | str | None" = None, hint: str | None = None):
        super().__init__(message)
        self.message, self.where, self.hint = message, where, hint
        self.file = where.file if isinstance(where, Loc) else where
        self.line = where.line if isinstance(where, Loc) else 0
        self.col = where.col if isinstance(where, Loc) else 0

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass(frozen=True)
class Loc:
    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"
