"""Reading the Debian mirror a machine's apt configuration names.

forge never hard-codes a mirror: `debian_rootfs` uses `[debian] mirror` from
forge.toml, or else the archive this machine's own apt sources point at. Both the
one-line format (`/etc/apt/sources.list`, `*.list`) and deb822 (`*.sources`) are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def read_sources(root: Path = Path("/etc/apt")) -> list[Source]:
    out: list[Source] = []
    files = [root / "sources.list"] + sorted((root / "sources.list.d").glob("*"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            out += _deb822(text)
        elif f.suffix == ".list" or f.name == "sources.list":
            out += _one_line(text)
    return out


def _one_line(text: str) -> list[Source]:
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = [w for w in words[1:] if not w.startswith("[")]  # drop [arch=...] options
        if len(words) >= 2:
            out.append(Source(words[0], (words[1],), tuple(words[2:])))
    return out


def _deb822(text: str) -> list[Source]:
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if ":" in line and not line.startswith((" ", "\t", "#")):
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append(Source(uri, tuple(fields.get("suites", "").split()),
                              tuple(fields.get("components", "").split())))
    return out


def debian_mirror(sources: list[Source]) -> str | None:
    """The main Debian archive among the sources: it serves a plain suite (no
    `-security`/`-updates` suffix) with the `main` component, from a path ending in
    /debian. Third-party repositories (no such path) are passed over."""
    for s in sources:
        plain = [x for x in s.suites if "-" not in x and "/" not in x]
        if plain and "main" in s.components and s.uri.rstrip("/").endswith("/debian"):
            return s.uri.rstrip("/")
    return None
