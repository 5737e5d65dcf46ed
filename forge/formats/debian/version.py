"""Debian version comparison, as policy 5.6.12 says.

`[epoch:]upstream[-revision]`: the epoch as a number, then upstream and revision by
alternating non-digit runs (letters before non-letters, `~` before anything, even the
end) and digit runs compared as numbers.
"""

from __future__ import annotations

import re

from forge.formats.debian.errors import DebError


def _order(c: str) -> int:
    return -1 if c == "~" else ord(c) if c.isalpha() else ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    while a or b:
        na, nb = re.match(r"[^0-9]*", a).group(), re.match(r"[^0-9]*", b).group()
        for k in range(max(len(na), len(nb))):
            oa = _order(na[k]) if k < len(na) else 0
            ob = _order(nb[k]) if k < len(nb) else 0
            if oa != ob:
                return -1 if oa < ob else 1
        a, b = a[len(na):], b[len(nb):]
        da, db = re.match(r"[0-9]*", a).group(), re.match(r"[0-9]*", b).group()
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
        a, b = a[len(da):], b[len(db):]
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, _, rest = v.strip().partition(":") if ":" in v else ("0", "", v.strip())
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    if not (epoch.isascii() and epoch.isdigit()) or not upstream:  # int() takes "²"
        raise DebError(f"not a Debian version: {v!r}")
    return int(epoch), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version `a` is older than, equal to or newer than `b`."""
    (ea, ua, ra), (eb, ub, rb) = _split_version(a), _split_version(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)
