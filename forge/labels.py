"""Labels (`//pkg/path:name`) and target patterns (`//pkg/...`, `//...`).

A label names one target or file: `package` is the workspace-relative path of
the directory holding the BUILD file ("" for the root), `name` is the target or
the package-relative file path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from forge.errors import UsageError

LABEL_FORMS = ("a label looks like //pkg/path:name, //pkg/path (meaning //pkg/path:path) "
               "or :name inside a package")
PATTERN_FORMS = ("a target pattern looks like //pkg:name, //pkg, //pkg:all, //pkg/... or //...")

_PKG_RE = re.compile(r"^[A-Za-z0-9_.+\-]+(/[A-Za-z0-9_.+\-]+)*$")
_NAME_BAD = re.compile(r"(^/)|(/$)|(//)|(^|/)\.\.?(/|$)|[:\0\n]")


class LabelError(UsageError):
    """A string that is not a valid label or pattern."""


@dataclass(frozen=True, order=True)
class Label:
    package: str
    name: str

    def __str__(self) -> str:
        return f"//{self.package}:{self.name}"

    @property
    def short(self) -> str:
        """`//pkg` when the name equals the package's last component."""
        if self.package and self.package.rsplit("/", 1)[-1] == self.name:
            return f"//{self.package}"
        return str(self)


def _check_package(pkg: str, text: str) -> None:
    if pkg and (not _PKG_RE.match(pkg) or any(p in (".", "..") for p in pkg.split("/"))):
        raise LabelError(f"invalid package name in '{text}'", hint=LABEL_FORMS)


def _check_name(name: str, text: str) -> None:
    if not name or _NAME_BAD.search(name):
        raise LabelError(f"invalid target name in '{text}'", hint=LABEL_FORMS)


def parse_label(text: str, package: str | None = None) -> Label:
    """Parse `text`; relative forms (`:name`, `name`) need the current `package`."""
    if not isinstance(text, str) or not text:
        raise LabelError(f"invalid label {text!r}: it is empty", hint=LABEL_FORMS)
    if text.startswith("@"):
        raise LabelError(f"invalid label '{text}': external repositories (@repo) are not supported",
                         hint=LABEL_FORMS)
    if text.startswith("//"):
        body = text[2:]
        if ":" in body:
            pkg, name = body.split(":", 1)
        else:
            pkg = body
            name = body.rsplit("/", 1)[-1] if body else ""
            if not name:
                raise LabelError(f"invalid label '{text}': '//' alone names no target",
                                 hint=LABEL_FORMS)
        _check_package(pkg, text)
        _check_name(name, text)
        return Label(pkg, name)
    if package is None:
        raise LabelError(f"invalid label '{text}': it must start with '//'", hint=LABEL_FORMS)
    name = text[1:] if text.startswith(":") else text
    _check_name(name, text)
    return Label(package, name)


@dataclass(frozen=True)
class Pattern:
    """`//pkg:name` (one target), `//pkg:all` (a package), `//pkg/...` (a subtree)."""

    package: str
    name: str | None  # None: every target of the package (or subtree)
    recursive: bool = False

    def __str__(self) -> str:
        if self.recursive:
            return f"//{self.package}/..." if self.package else "//..."
        return f"//{self.package}:{self.name or 'all'}"

    def covers_package(self, pkg: str) -> bool:
        if self.recursive:
            return not self.package or pkg == self.package or pkg.startswith(self.package + "/")
        return pkg == self.package


def parse_pattern(text: str, cwd_package: str = "") -> Pattern:
    """Parse a command-line pattern; relative ones are resolved from `cwd_package`."""
    if not text:
        raise LabelError("empty target pattern", hint=PATTERN_FORMS)
    if text.startswith("@"):
        raise LabelError(f"invalid target pattern '{text}': external repositories are not supported",
                         hint=PATTERN_FORMS)
    if text.startswith("//"):
        body = text[2:]
    elif text.startswith(":"):
        body = f"{cwd_package}{text}"
    else:
        body = f"{cwd_package}/{text}" if cwd_package else text
    if body == "..." or body.endswith("/..."):
        pkg = body[:-3].rstrip("/")
        try:
            _check_package(pkg, text)
        except LabelError:
            raise LabelError(f"invalid target pattern '{text}'", hint=PATTERN_FORMS) from None
        return Pattern(pkg, None, recursive=True)
    if body.endswith(":all") or body.endswith(":*") or body.endswith(":all-targets"):
        pkg = body.rsplit(":", 1)[0]
        _check_package(pkg, text)
        return Pattern(pkg, None)
    try:
        label = parse_label("//" + body)
    except LabelError as e:
        raise LabelError(f"invalid target pattern '{text}'", hint=PATTERN_FORMS) from e
    return Pattern(label.package, label.name)
