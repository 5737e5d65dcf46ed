"""Debian's machine-readable copyright files (DEP-5), read for the licences they declare.

A machine-readable `/usr/share/doc/PKG/copyright` starts with a header paragraph whose
`Format:` names https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/, then
`Files:` paragraphs, each with a `License:` line whose first line is a licence expression
in Debian's short names (`GPL-2+ or Artistic`, `BSD-3-clause`). Files in the older free
form have no such structure: for them the licence is unknown, never guessed.

Debian's short names are mostly SPDX identifiers in another spelling; the table below maps
the common ones. Any other name becomes `LicenseRef-<name>`, which SPDX documents must
then define (`extracted`), so the caller gets those names too.
"""

from __future__ import annotations

import re

from forge.formats.debian.deb822 import parse_stanzas
from forge.formats.debian.errors import DebError

FORMAT_URL = "copyright-format/1.0"

# Debian short name (lower case) -> SPDX identifier.
_SPDX = {
    "apache-2.0": "Apache-2.0", "artistic": "Artistic-1.0", "artistic-1.0": "Artistic-1.0",
    "artistic-2.0": "Artistic-2.0", "bsd-2-clause": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause",
    "bsd-4-clause": "BSD-4-Clause", "isc": "ISC", "expat": "MIT", "mit": "MIT", "zlib": "Zlib",
    "cc0-1.0": "CC0-1.0", "cc0": "CC0-1.0", "mpl-1.1": "MPL-1.1", "mpl-2.0": "MPL-2.0",
    "gpl-1": "GPL-1.0-only", "gpl-1+": "GPL-1.0-or-later", "gpl-2": "GPL-2.0-only",
    "gpl-2+": "GPL-2.0-or-later", "gpl-3": "GPL-3.0-only", "gpl-3+": "GPL-3.0-or-later",
    "lgpl-2": "LGPL-2.0-only", "lgpl-2+": "LGPL-2.0-or-later", "lgpl-2.0": "LGPL-2.0-only",
    "lgpl-2.0+": "LGPL-2.0-or-later", "lgpl-2.1": "LGPL-2.1-only", "lgpl-2.1+": "LGPL-2.1-or-later",
    "lgpl-3": "LGPL-3.0-only", "lgpl-3+": "LGPL-3.0-or-later", "agpl-3": "AGPL-3.0-only",
    "agpl-3+": "AGPL-3.0-or-later", "gfdl-1.2+": "GFDL-1.2-or-later", "gfdl-1.3+": "GFDL-1.3-or-later",
    "openssl": "OpenSSL", "python-2.0": "Python-2.0", "psf-2": "PSF-2.0", "zpl-2.1": "ZPL-2.1",
    "ofl-1.1": "OFL-1.1", "x11": "X11", "curl": "curl", "bsl-1.0": "BSL-1.0", "unlicense": "Unlicense",
    "wtfpl": "WTFPL", "0bsd": "0BSD", "ftl": "FTL", "libpng": "Libpng", "ntp": "NTP",
    "gpl-2.0": "GPL-2.0-only", "gpl-2.0+": "GPL-2.0-or-later", "gpl-3.0": "GPL-3.0-only",
    "gpl-3.0+": "GPL-3.0-or-later", "gpl-2.0-or-later": "GPL-2.0-or-later",
    "gpl-3.0-or-later": "GPL-3.0-or-later", "lgpl-2.1-or-later": "LGPL-2.1-or-later",
}
_OPERATOR = re.compile(r"\s+(or|and)\s+|\s*,\s*(?:and\s+)?", re.IGNORECASE)


def is_machine_readable(text: str) -> bool:
    head = text.lstrip().split("\n", 1)[0]
    return head.lower().startswith("format:") and FORMAT_URL in head


def license_ref(name: str) -> str:
    """The SPDX LicenseRef for a Debian licence name SPDX has no identifier for."""
    return "LicenseRef-" + (re.sub(r"[^A-Za-z0-9.\-]+", "-", name).strip("-") or "unknown")


def spdx_expression(debian: str) -> tuple[str, dict[str, str]]:
    """The SPDX expression for one `License:` first line, and the LicenseRefs it uses
    ({ref: Debian name}). `with ... exception` clauses name no SPDX exception reliably:
    the whole term becomes one LicenseRef."""
    refs: dict[str, str] = {}
    parts = _OPERATOR.split(debian.strip())
    out = []
    for i, part in enumerate(parts):
        if part is None:
            continue
        if i % 2 == 1:  # an operator ("or", "and", or None for a comma, which means and)
            out.append(part.upper())
            continue
        term = part.strip()
        if not term:
            continue
        spdx = _SPDX.get(term.lower())
        if spdx is None:
            spdx = license_ref(term)
            refs[spdx] = term
        out.append(spdx)
    # a comma split leaves no operator between terms: they are ANDed
    fixed: list[str] = []
    for tok in out:
        if fixed and tok not in ("OR", "AND") and fixed[-1] not in ("OR", "AND"):
            fixed.append("AND")
        fixed.append(tok)
    while fixed and fixed[-1] in ("OR", "AND"):
        fixed.pop()
    expr = " ".join(fixed)
    return expr, refs


def licenses(text: str) -> tuple[str | None, dict[str, str]]:
    """The licence of a package from its copyright file: the distinct expressions of its
    `Files:` paragraphs ANDed (in the order they first appear), and the LicenseRefs
    used. None when the file is not machine-readable or declares no licence."""
    if not is_machine_readable(text):
        return None, {}
    try:
        stanzas = parse_stanzas(text)
    except DebError:  # a malformed file: its licence is unknown, as for free-form ones
        return None, {}
    exprs: list[str] = []
    refs: dict[str, str] = {}
    for st in stanzas:
        if "Files" not in st or not st.get("License", "").strip():
            continue
        first = st["License"].strip().split("\n", 1)[0].strip()
        expr, r = spdx_expression(first)
        if expr and expr not in exprs:
            exprs.append(expr)
            refs.update(r)
    if not exprs:
        return None, {}
    if len(exprs) == 1:
        return exprs[0], refs
    return " AND ".join(f"({e})" if " " in e else e for e in exprs), refs
