"""Reading the Debian mirror a machine's apt configuration names.

forge never hard-codes a mirror: `debian_rootfs` uses `[debian] mirror` from
forge.toml, or else the archive this machine's own apt sources point at. Both the
one-line format (`/etc/apt/sources.list`, `*.list`) and deb822 (`*.sources`) are read,
with the options that say which keys a source is signed by: one-line
`deb [arch=amd64 signed-by=/k.gpg] URI suite components` and deb822 `Signed-By:` (file
paths, comma-separated, or an embedded armoured key block).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Source:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    # keyring paths, or one embedded armoured key block; empty: apt's default keyrings
    signed_by: tuple[str, ...] = ()


def read_sources(root: Path = Path("/etc/apt"), *,
                 read: Callable[[Path], bytes] = Path.read_bytes,
                 listdir: Callable[[Path], list[str]] = os.listdir) -> list[Source]:
    """The `deb` sources of an apt configuration directory. `read` and `listdir` are how
    files are looked at (a caller may record what was read)."""
    out: list[Source] = []
    try:
        names = sorted(listdir(root / "sources.list.d"))
    except OSError:
        names = []
    for f in [root / "sources.list"] + [root / "sources.list.d" / n for n in names]:
        if not (f.suffix in (".sources", ".list") or f.name == "sources.list"):
            continue
        try:
            text = read(f).decode("utf-8", "replace")
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
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb") or line[3:4] not in (" ", "\t"):
            continue
        rest, options = line[3:].strip(), {}
        if rest.startswith("["):  # [ key=value key2=v1,v2 ], spaces allowed inside
            inside, sep, rest = rest[1:].partition("]")
            if not sep:
                continue  # apt rejects an unclosed option list
            for opt in inside.split():
                key, _, value = opt.partition("=")
                options[key.rstrip("+-").lower()] = value
        words = rest.split()
        if len(words) >= 2:
            signed = tuple(x for x in options.get("signed-by", "").split(",") if x)
            out.append(Source(words[0], (words[1],), tuple(words[2:]), signed))
    return out


def _deb822(text: str) -> list[Source]:
    out = []
    lines = [l for l in text.splitlines() if not l.startswith("#")]
    for block in "\n".join(lines).split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:  # a continued field (an embedded key)
                fields[key] += "\n" + ("" if line.strip() == "." else line.strip())
            elif ":" in line:
                key, v = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = v.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        signed = fields.get("signed-by", "").strip()
        signed_by = (signed,) if "BEGIN PGP" in signed else \
            tuple(x for x in signed.replace(",", " ").split() if x)
        for uri in fields.get("uris", "").split():
            out.append(Source(uri, tuple(fields.get("suites", "").split()),
                              tuple(fields.get("components", "").split()), signed_by))
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
