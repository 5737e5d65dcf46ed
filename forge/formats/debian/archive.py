"""The Debian archive (a mirror's `dists/` and `pool/`): its indexes, and downloads from it.

An archive has `dists/<suite>/InRelease` (the `Release` file, clearsigned) listing under
`SHA256:` the digest, size and path of each index, e.g. `main/binary-amd64/Packages.xz`.
A `Packages` index is deb822 (`forge.formats.debian.deb822`), one stanza per package
version, with `Package`, `Version`, `Depends`, `Filename` (from the mirror root), `Size`,
`SHA256`. With `Acquire-By-Hash: yes` the index is fetched as `by-hash/SHA256/<digest>`,
so a mirror updated between two downloads cannot mix generations.

Trust: the OpenPGP signature of InRelease is NOT checked. The index must match the
Release file's digest, and pins every package by SHA256 and size, so a package is exactly
what that Release file named; authenticating the Release file is left to the transport.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import lzma
import os
import re
import tempfile
import urllib.error
import urllib.request
from difflib import get_close_matches
from pathlib import Path
from typing import BinaryIO, Callable

from forge.formats.debian.deb822 import parse_stanzas
from forge.formats.debian.errors import DebError
from forge.formats.debian.version import compare_versions

Fetch = Callable[[str], BinaryIO]  # url -> readable stream; a missing file raises FileNotFoundError

_CHUNK = 1 << 20


# ---- indexes -----------------------------------------------------------------------------

def _strip_clearsign(text: str) -> str:
    if not text.startswith("-----BEGIN PGP SIGNED MESSAGE-----"):
        return text
    body = text.split("\n\n", 1)[1]  # after the armor headers (Hash: ...)
    body = body.split("\n-----BEGIN PGP SIGNATURE-----", 1)[0]
    return "\n".join(l[2:] if l.startswith("- ") else l for l in body.splitlines())


def release_digests(text: str) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
    """A Release or InRelease file's fields, and path -> (sha256, size) from its `SHA256:`."""
    fields = (parse_stanzas(_strip_clearsign(text)) or [{}])[0]
    if "SHA256" not in fields:
        raise DebError("Release file has no SHA256 section")
    rows = [line.split() for line in fields["SHA256"].splitlines()]
    return fields, {w[2]: (w[0].lower(), int(w[1])) for w in rows if len(w) == 3}


def urlopen_fetch(url: str) -> BinaryIO:
    try:
        return urllib.request.urlopen(url, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise FileNotFoundError(f"{url}: HTTP {e.code}") from None
        raise


def _read_all(fetch: Fetch, url: str) -> bytes:
    with fetch(url) as r:
        return r.read()


def fetch_index(mirror: str, suite: str, component: str = "main", arch: str = "amd64", *,
                fetch: Fetch = urlopen_fetch) -> list[dict[str, str]]:
    """The parsed `Packages` index of one suite, component and architecture, verified
    against the suite's Release file (see the module docstring for what is trusted)."""
    base = f"{mirror.rstrip('/')}/dists/{suite}"
    try:
        release = _read_all(fetch, f"{base}/InRelease")
    except FileNotFoundError:
        release = _read_all(fetch, f"{base}/Release")
    fields, digests = release_digests(release.decode("utf-8", "replace"))
    by_hash = fields.get("Acquire-By-Hash", "").lower() == "yes"
    stem = f"{component}/binary-{arch}/Packages"
    for suffix in (".xz", ".gz", ""):
        if stem + suffix in digests:
            break
    else:
        raise DebError(f"{base}: Release lists no {stem}[.xz|.gz]")
    sha, size = digests[stem + suffix]
    url = f"{base}/{component}/binary-{arch}/by-hash/SHA256/{sha}" if by_hash else f"{base}/{stem}{suffix}"
    data = _read_all(fetch, url)
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
        raise DebError(f"{url}: got {len(data)} bytes with sha256 "
                       f"{hashlib.sha256(data).hexdigest()}, Release says {size} bytes, {sha}")
    data = {".xz": lzma.decompress, ".gz": gzip.decompress, "": bytes}[suffix](data)
    return parse_stanzas(data.decode("utf-8", "replace"))


def depends(entry: dict[str, str], field: str = "Depends") -> list[list[str]]:
    """A relation field as alternatives of package names (versions and arches dropped):
    `a (>= 1) | b, c` -> [["a", "b"], ["c"]]."""
    out = []
    for clause in entry.get(field, "").split(","):
        names = [re.split(r"[\s(:\[<]", alt.strip(), maxsplit=1)[0] for alt in clause.split("|")]
        if any(names):
            out.append([n for n in names if n])
    return out


def resolve(packages: list[dict[str, str]], name: str, version: str | None = None) -> dict[str, str]:
    """The index entry of `name` at `version`, or at its newest version."""
    found = [p for p in packages if p.get("Package") == name]
    if not found:
        close = get_close_matches(name, sorted({p.get("Package", "") for p in packages}), n=5)
        raise DebError(f"no package {name!r} in the index"
                       + (f"; close names: {', '.join(close)}" if close else ""))
    if version is not None:
        exact = [p for p in found if compare_versions(p["Version"], version) == 0]
        if not exact:
            raise DebError(f"{name} has no version {version} (has "
                           f"{', '.join(p['Version'] for p in found)})")
        return exact[0]
    return max(found, key=functools.cmp_to_key(lambda x, y: compare_versions(x["Version"], y["Version"])))


def download(mirror: str, entry: dict[str, str], dest: str | os.PathLike, *,
             fetch: Fetch = urlopen_fetch) -> Path:
    """Fetch `entry`'s file to `dest`, checked against its SHA256 and Size; `dest`
    appears only complete and verified."""
    dest = Path(dest)
    want, size = entry["SHA256"].lower(), int(entry["Size"])
    url = f"{mirror.rstrip('/')}/{entry['Filename'].lstrip('/')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        h, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, fetch(url) as r:
            while chunk := r.read(_CHUNK):
                h.update(chunk)
                n += len(chunk)
                if n > size:
                    raise DebError(f"{url}: more than the {size} bytes the index says")
                out.write(chunk)
        if n != size or h.hexdigest() != want:
            raise DebError(f"{url}: got {n} bytes with sha256 {h.hexdigest()}, "
                           f"the index says {size} bytes, {want}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest

