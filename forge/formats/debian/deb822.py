"""deb822, the "Field: value" format of Debian control files and archive indexes.

Stanzas of "Field: value" lines (continuation lines start with a space or tab) separated
by blank lines; field names are kept as written ("SHA256", "Package").
"""

from __future__ import annotations

from forge.formats.debian.errors import DebError


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """deb822 stanzas; a continued field's lines are joined with newlines."""
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur, key = {}, None
        elif line[0] in " \t":
            if key is None:
                raise DebError(f"continuation line before any field: {line!r}")
            cur[key] += "\n" + line[1:]
        else:
            key, sep, value = line.partition(":")
            if not sep:
                raise DebError(f"not a 'Field: value' line: {line!r}")
            key = key.strip()  # kept as written: "SHA256", "Package"
            cur[key] = value.strip()
    if cur:
        out.append(cur)
    return out
