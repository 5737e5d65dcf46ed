"""Debian binary packages and archive indexes, read without dpkg or apt.

A `.deb` is an `ar` archive (`!<arch>\\n`, then per member a 60-byte header: name[16]
mtime[12] uid[6] gid[6] mode[8] size[10] "`\\n", the data padded to an even length) of
`debian-binary`, `control.tar[.gz|.xz|.zst]` (`./control`, maintainer scripts) and
`data.tar[.gz|.xz|.zst|.bz2]` (the files). The member's suffix names its compression;
zstd needs the optional `zstandard` module.

An archive has `dists/<suite>/InRelease` (the `Release` file, clearsigned) listing under
`SHA256:` the digest, size and path of each index, e.g. `main/binary-amd64/Packages.xz`.
A `Packages` index is deb822: stanzas of "Field: value" lines (continuation lines start
with a space or tab) separated by blank lines, one per package version, with `Package`,
`Version`, `Depends`, `Filename` (from the mirror root), `Size`, `SHA256`. With
`Acquire-By-Hash: yes` the index is fetched as `by-hash/SHA256/<digest>`, so a mirror
updated between two downloads cannot mix generations.

Trust: the OpenPGP signature of InRelease is NOT checked. The index must match the
Release file's digest, and pins every package by SHA256 and size, so a package is exactly
what that Release file named; authenticating the Release file is left to the transport.

Versions compare as Debian policy 5.6.12 says: `[epoch:]upstream[-revision]`, the epoch
as a number, then upstream and revision by alternating non-digit runs (letters before
non-letters, `~` before anything, even the end) and digit runs compared as numbers.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import BinaryIO, Callable
from forge.formats.debian.errors import DebError

Fetch = Callable[[str], BinaryIO]  # url -> readable stream; a missing file raises FileNotFoundError

_AR_MAGIC = b"!<arch>\n"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArMember:
    name: str
    offset: int  # of the member's data in the archive
    size: int


# ---- the ar container ------------------------------------------------------------------

def read_ar(fileobj: BinaryIO) -> list[ArMember]:
    """The members of an ar archive, as positions: nothing but the headers is read."""
    if fileobj.read(8) != _AR_MAGIC:
        raise DebError("not an ar archive (no !<arch> magic)")
    pos, out = 8, []
    while True:
        fileobj.seek(pos)
        head = fileobj.read(60)
        if not head:
            return out
        if len(head) < 60 or head[58:60] != b"`\n":
            raise DebError(f"corrupt ar member header at offset {pos}")
        name = head[:16].decode("ascii", "replace").rstrip()
        size = int(head[48:58].decode("ascii").strip() or 0)
        data = pos + 60
        if name.startswith("#1/"):  # BSD ar: the name leads the data
            n = int(name[3:])
            name, data, size = fileobj.read(n).rstrip(b"\0").decode(), data + n, size - n
        out.append(ArMember(name.rstrip("/"), data, size))  # GNU ar ends names with "/"
        pos = data + size + ((data + size) & 1)


class _Section:
    """A byte range of a file, seekable within itself (decompressors rewind to 0)."""

    def __init__(self, f: BinaryIO, offset: int, size: int):
        self._f, self._start, self._size, self._pos = f, offset, size, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, min(self._size, pos + (0, self._pos, self._size)[whence]))
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = self._size - self._pos
        self._f.seek(self._start + self._pos)
        data = self._f.read(left if n is None or n < 0 else min(n, left))
        self._pos += len(data)
        return data


class _OwningTarFile(tarfile.TarFile):
    _owned: list = []  # the streams below: closed too, so a plain `with` works

    def close(self) -> None:
        super().close()
        for f in self._owned:
            f.close()


_TAR_MODES = {".tar": "r:", ".gz": "r:gz", ".xz": "r:xz", ".bz2": "r:bz2"}


def _open_member_tar(deb_path: str | os.PathLike, prefix: str) -> tarfile.TarFile:
    owned = [open(deb_path, "rb")]
    try:
        members = read_ar(owned[0])
        m = next((m for m in members if m.name.startswith(prefix)), None)
        if m is None:
            raise DebError(f"{deb_path}: no {prefix}* member (has {[x.name for x in members]})")
        stream, ext = _Section(owned[0], m.offset, m.size), m.name[len(prefix):] or ".tar"
        if ext == ".zst":
            try:
                import zstandard  # optional: not in the standard library before 3.14
            except ImportError:
                raise DebError(f"{m.name} is zstd-compressed, but the zstandard module is not "
                               "installed (pip install zstandard)") from None
            # zstandard's reader cannot seek backwards, which random tar access needs: spool.
            owned.append(tempfile.TemporaryFile())
            with zstandard.ZstdDecompressor().stream_reader(stream) as r:
                shutil.copyfileobj(r, owned[-1], _CHUNK)
            stream, ext = owned[-1], ".tar"
            stream.seek(0)
        if ext not in _TAR_MODES:
            raise DebError(f"{deb_path}: unknown compression of member {m.name}")
        tf = _OwningTarFile.open(fileobj=stream, mode=_TAR_MODES[ext])
    except BaseException:
        for f in owned:
            f.close()
        raise
    tf._owned = owned
    return tf


def open_data_tar(deb_path: str | os.PathLike) -> tarfile.TarFile:
    """The package's file tree. Reading members in archive order streams; going back
    re-decompresses from the start."""
    return _open_member_tar(deb_path, "data.tar")


def control_fields(deb_path: str | os.PathLike) -> dict[str, str]:
    with _open_member_tar(deb_path, "control.tar") as tf:
        for m in tf:
            if m.name in ("control", "./control"):
                stanzas = parse_packages(tf.extractfile(m).read().decode("utf-8", "replace"))
                if stanzas:
                    return stanzas[0]
    raise DebError(f"{deb_path}: control.tar has no control file")


# ---- indexes -----------------------------------------------------------------------------

def parse_packages(text: str) -> list[dict[str, str]]:
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


def _strip_clearsign(text: str) -> str:
    if not text.startswith("-----BEGIN PGP SIGNED MESSAGE-----"):
        return text
    body = text.split("\n\n", 1)[1]  # after the armor headers (Hash: ...)
    body = body.split("\n-----BEGIN PGP SIGNATURE-----", 1)[0]
    return "\n".join(l[2:] if l.startswith("- ") else l for l in body.splitlines())


def release_digests(text: str) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
    """A Release or InRelease file's fields, and path -> (sha256, size) from its `SHA256:`."""
    fields = (parse_packages(_strip_clearsign(text)) or [{}])[0]
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
    return parse_packages(data.decode("utf-8", "replace"))


def depends(entry: dict[str, str], field: str = "Depends") -> list[list[str]]:
    """A relation field as alternatives of package names (versions and arches dropped):
    `a (>= 1) | b, c` -> [["a", "b"], ["c"]]."""
    out = []
    for clause in entry.get(field, "").split(","):
        names = [re.split(r"[\s(:\[<]", alt.strip(), maxsplit=1)[0] for alt in clause.split("|")]
        if any(names):
            out.append([n for n in names if n])
    return out


# ---- versions ----------------------------------------------------------------------------

def _order(c: str) -> int:
    return -1 if c == "~" else ord(c) if c.isalpha() else ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    while a or b:
        na, nb = re.match(r"\D*", a).group(), re.match(r"\D*", b).group()
        for k in range(max(len(na), len(nb))):
            oa = _order(na[k]) if k < len(na) else 0
            ob = _order(nb[k]) if k < len(nb) else 0
            if oa != ob:
                return -1 if oa < ob else 1
        a, b = a[len(na):], b[len(nb):]
        da, db = re.match(r"\d*", a).group(), re.match(r"\d*", b).group()
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
        a, b = a[len(da):], b[len(db):]
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, _, rest = v.strip().partition(":") if ":" in v else ("0", "", v.strip())
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    if not epoch.isdigit() or not upstream:
        raise DebError(f"not a Debian version: {v!r}")
    return int(epoch), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version `a` is older than, equal to or newer than `b`."""
    (ea, ua, ra), (eb, ub, rb) = _split_version(a), _split_version(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


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

