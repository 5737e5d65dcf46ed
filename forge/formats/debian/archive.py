"""The Debian archive (a mirror's `dists/` and `pool/`): its indexes, and downloads from it.

An archive has `dists/<suite>/InRelease` (the `Release` file, clearsigned) listing under
`SHA256:` the digest, size and path of each index, e.g. `main/binary-amd64/Packages.xz`.
A `Packages` index is deb822 (`forge.formats.debian.deb822`), one stanza per package
version, with `Package`, `Version`, `Depends`, `Filename` (from the mirror root), `Size`,
`SHA256`. With `Acquire-By-Hash: yes` the index is fetched as `by-hash/SHA256/<digest>`,
so a mirror updated between two downloads cannot mix generations.

Trust: the Release file is authenticated first (`forge.formats.debian.release`: its
OpenPGP signature by gpgv against the caller's keyrings, its dates), then the index must
match the digest and size that verified Release names, and the index pins every package by
SHA256 and size: so a package is exactly what a Release signed by a trusted key named.

Downloads go through the shared HTTP client (`forge.formats.http`: pooled connections,
the proxy variables, retries, and a cut package download resumed with `Range`); a
`file://` mirror is read from disk.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import lzma
import os
import re
import tempfile
import zlib
from difflib import get_close_matches
from pathlib import Path
from typing import BinaryIO, Callable, Sequence
from urllib.parse import unquote, urlsplit

from forge.formats.debian import release as rel
from forge.formats.debian.deb822 import parse_stanzas
from forge.formats.debian.errors import DebError, DigestMismatchError, MirrorError
from forge.formats.debian.keyring import Keyring
from forge.formats.debian.version import compare_versions
from forge.formats.http.client import default_client
from forge.formats.http.errors import HttpError, NotFoundError

Fetch = Callable[[str], BinaryIO]  # url -> readable stream; a missing file raises FileNotFoundError

_CHUNK = 1 << 20


# ---- indexes -----------------------------------------------------------------------------

def http_fetch(url: str) -> BinaryIO:
    """The file at `url` (http, https or file) as a stream; FileNotFoundError for a 404."""
    if urlsplit(url).scheme == "file":
        return open(unquote(urlsplit(url).path), "rb")
    try:
        return io.BytesIO(default_client().get(url))
    except NotFoundError:
        raise FileNotFoundError(f"{url}: HTTP 404") from None
    except HttpError as e:
        raise MirrorError(f"{e} (check [debian] mirror in forge.toml, and the proxy "
                          "variables)") from None


def _read_all(fetch: Fetch, url: str) -> bytes:
    with fetch(url) as r:
        return r.read()


def _read_optional(fetch: Fetch, url: str) -> bytes | None:
    try:
        return _read_all(fetch, url)
    except FileNotFoundError:
        return None


def fetch_release(mirror: str, suite: str, *, keyrings: Sequence[Keyring],
                  fetch: Fetch = http_fetch, now: float | None = None,
                  insecure: bool = False) -> rel.Release:
    """The suite's Release, authenticated as apt does (InRelease, else Release and
    Release.gpg); a `ReleaseError` when it cannot be. `insecure` skips the signature."""
    base = f"{mirror.rstrip('/')}/dists/{suite}"
    inrelease = _read_optional(fetch, f"{base}/InRelease")
    release = signature = None
    if inrelease is None:
        release = _read_optional(fetch, f"{base}/Release")
        if release is None:
            raise FileNotFoundError(f"{base}: the mirror has no suite {suite} (no InRelease, "
                                    "no Release)")
        signature = None if insecure else _read_optional(fetch, f"{base}/Release.gpg")
    return rel.verify(suite, mirror, inrelease=inrelease, release=release, signature=signature,
                      keyrings=keyrings, now=now, insecure=insecure)


def fetch_index(mirror: str, suite: str, component: str = "main", arch: str = "amd64", *,
                keyrings: Sequence[Keyring], fetch: Fetch = http_fetch,
                now: float | None = None, insecure: bool = False) -> list[dict[str, str]]:
    """The parsed `Packages` index of one suite, component and architecture, checked
    against the suite's authenticated Release (see the module docstring)."""
    release = fetch_release(mirror, suite, keyrings=keyrings, fetch=fetch, now=now,
                            insecure=insecure)
    base = f"{mirror.rstrip('/')}/dists/{suite}"
    by_hash = release.fields.get("Acquire-By-Hash", "").lower() == "yes"
    stem = f"{component}/binary-{arch}/Packages"
    for suffix in (".xz", ".gz", ""):
        if stem + suffix in release.digests:
            break
    else:
        raise DebError(f"{base}: Release lists no {stem}[.xz|.gz]")
    sha, size = release.digests[stem + suffix]
    url = f"{base}/{component}/binary-{arch}/by-hash/SHA256/{sha}" if by_hash else f"{base}/{stem}{suffix}"
    data = _read_all(fetch, url)
    got = hashlib.sha256(data).hexdigest()
    if len(data) != size or got != sha:
        raise DigestMismatchError(
            f"{url}: got {len(data)} bytes with sha256 {got}, but the verified Release of "
            f"suite {suite} on mirror {mirror} names {stem}{suffix} with {size} bytes, sha256 "
            f"{sha}: the mirror serves a different file (out of sync, or altered)")
    try:
        data = {".xz": lzma.decompress, ".gz": gzip.decompress, "": bytes}[suffix](data)
    except (lzma.LZMAError, OSError, EOFError, zlib.error) as e:  # gzip raises all three
        raise DebError(f"{url}: the index {stem}{suffix} of suite {suite} on mirror {mirror} "
                       f"does not decompress ({e or type(e).__name__})") from None
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
    for p in found:
        if not p.get("Version"):
            raise DebError(f"the index entry of package {name!r} has no Version field: the "
                           "Packages index is malformed")
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
             fetch: Fetch | None = None) -> Path:
    """Fetch `entry`'s file to `dest`, checked against its SHA256 and Size; `dest`
    appears only complete and verified. Without `fetch`, a cut download is resumed."""
    dest = Path(dest)
    try:
        want, size, filename = entry["SHA256"].lower(), int(entry["Size"]), entry["Filename"]
    except (KeyError, ValueError) as e:
        what = (f"no {e.args[0]} field" if isinstance(e, KeyError)
                else f"a Size that is not a number ({entry['Size']!r})")
        raise DebError(f"the index entry of package {entry.get('Package')!r} of mirror {mirror} "
                       f"has {what}: the Packages index is malformed") from None
    url = f"{mirror.rstrip('/')}/{filename.lstrip('/')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            sink = _Checked(out, url, size, mirror)
            if fetch is None and urlsplit(url).scheme in ("http", "https"):
                try:
                    default_client().download(url, sink, size=size, label=entry["Filename"])
                except NotFoundError:
                    raise FileNotFoundError(f"{url}: HTTP 404: mirror {mirror} lacks "
                                            f"{entry['Filename']} (an index out of date?)") from None
                except HttpError as e:
                    raise MirrorError(f"{e} (check [debian] mirror in forge.toml, and the "
                                      "proxy variables)") from None
            else:
                with (fetch or http_fetch)(url) as r:
                    while chunk := r.read(_CHUNK):
                        sink.write(chunk)
        if sink.n != size or sink.h.hexdigest() != want:
            raise DigestMismatchError(
                f"{url}: got {sink.n} bytes with sha256 {sink.h.hexdigest()}, but the index "
                f"names {entry['Filename']} with {size} bytes, sha256 {want}: mirror {mirror} "
                "serves a different file (out of sync, or altered)")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


class _Checked:
    """A package file being written: its sha256 as it comes, never more than `size`."""

    def __init__(self, out: BinaryIO, url: str, size: int, mirror: str):
        self.out, self.url, self.size, self.mirror = out, url, size, mirror
        self.restart()

    def write(self, chunk: bytes) -> None:
        self.h.update(chunk)
        self.n += len(chunk)
        if self.n > self.size:
            raise DigestMismatchError(f"{self.url}: more than the {self.size} bytes the index "
                                      f"says; mirror {self.mirror} serves a different file")
        self.out.write(chunk)

    def restart(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.h, self.n = hashlib.sha256(), 0
