"""Harnesses for what Debian mirrors and apt configurations hold: `.deb` (ar and its
member tars), deb822 stanzas, Release and Packages, the archive client (index, resolve,
download) and apt sources. Each accepts only DebError (apt sources: nothing)."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import tarfile
from pathlib import Path

from hypothesis import strategies as st

from fuzz_strategies import seeded, tar_archive, text
from fuzzlib import Harness

from forge.formats.debian.errors import DebError

# ---- packages ------------------------------------------------------------------------------


def run_deb(data: bytes, tmp: Path) -> None:
    from forge.formats.debian import package
    (tmp / "in").mkdir()
    deb = tmp / "in" / "p.deb"
    deb.write_bytes(data)
    package.control_fields(deb)
    with package.open_data_tar(deb) as tf:
        for m in tf:
            if m.isfile():
                tf.extractfile(m).read()


@st.composite
def deb_file(draw) -> bytes:
    def member(name: str, body: bytes) -> bytes:
        size = draw(st.sampled_from([len(body)] * 4 + [0, len(body) + 7, -3, 10**12]))
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{size:<10}".encode()[:58] + b"`\n"
        return head + body + (b"\n" if len(body) % 2 else b"")
    control = draw(st.sampled_from([b"Package: p\nVersion: 1\n", b"Package p\n", b" x\n", b""]))
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        ti = tarfile.TarInfo(draw(st.sampled_from(["control", "./control", "x"])))
        ti.size = len(control)
        tf.addfile(ti, io.BytesIO(control))
    ctl = tar.getvalue()
    comp = draw(st.sampled_from(["", ".gz", ".xz", ".zst", ".bz2", ".lz4"]))
    ctl = {".gz": lambda b: gzip.compress(b, mtime=0), ".xz": lzma.compress}.get(comp, lambda b: b)(ctl)
    data = draw(tar_archive(4))
    names = draw(st.sampled_from([["debian-binary", "control.tar" + comp, "data.tar"],
                                  ["debian-binary", "data.tar"], ["#1/20", "control.tar"]]))
    bodies = [b"2.0\n", ctl, data][:len(names)]
    return b"!<arch>\n" + b"".join(member(n, b) for n, b in zip(names, bodies))


def _control_sample() -> bytes:
    from package_builders import CONTROL  # the control file the .deb tests build with
    return CONTROL.format(name="hello", version="1.0-1").encode()


def run_deb822(data: bytes, tmp: Path) -> None:
    from forge.formats.debian import archive, release
    from forge.formats.debian.deb822 import parse_stanzas
    text_ = data.decode("utf-8", "replace")
    stanzas = parse_stanzas(text_)
    for s in stanzas:
        archive.depends(s)
        archive.depends(s, "Pre-Depends")
    if stanzas:
        names = [s["Package"] for s in stanzas if s.get("Package")]
        for name in names[:3]:
            archive.resolve(stanzas, name)
            archive.resolve(stanzas, name, stanzas[0].get("Version", "1"))
    fields, _digests = release.parse(text_, "Release")
    release.check_dates(fields, "Release", {}, now=1.7e9)


_FIELDS = st.sampled_from(["Package", "Version", "Depends", "Pre-Depends", "Filename", "Size",
                           "SHA256", "Architecture", "Suite", "Codename", "Date", "Valid-Until",
                           "Acquire-By-Hash", "Description", "X"])
_FIELD_VALUES = st.sampled_from([
    "p", "1.0-1", "1:2.3~rc1-4+b1", "a (>= 1) | b, c:any [amd64] <!nocheck>", "", "5", "-1", "x",
    "Sat, 01 Jan 2000 00:00:00 UTC", "not a date", "Sat, 99 Foo 2000 25:61:00 +9999",
    "\n " + "0" * 64 + " 12 main/binary-amd64/Packages", "\n abc x main/Packages",
    "\n " + "0" * 64 + " 12", "pool/main/p/p.deb", "yes", "\n .\n more", "1.0:", "::", "~~",
    "1.0-", "a:b-c:d"])


@st.composite
def deb822_text(draw) -> str:
    stanzas = []
    for _ in range(draw(st.integers(1, 4))):
        stanzas.append("\n".join(f"{f}: {draw(_FIELD_VALUES)}"
                                 for f in draw(st.lists(_FIELDS, max_size=6))))
    return "\n\n".join(stanzas) + "\n"


def run_archive(data: bytes, tmp: Path) -> None:
    """fetch_index and download against a mirror that is a function serving the input:
    a Release (insecure: gpgv is tested for real in tests/formats/debian/test_release.py),
    a Packages index named in it ("@SHA" and "@SIZE" stand for its digest and size),
    and the package files its entries name."""
    from forge.formats.debian import archive
    rel_text, _, packages = data.partition(b"\0")
    compressed = {b"X": lzma.compress, b"G": lambda b: gzip.compress(b, mtime=0)}.get(packages[:1])
    served = compressed(packages[1:]) if compressed else packages
    rel_text = rel_text.replace(b"@SHA", hashlib.sha256(served).hexdigest().encode()) \
        .replace(b"@SIZE", str(len(served)).encode())

    def fetch(url: str):
        if url.endswith("/InRelease"):
            raise FileNotFoundError(url)
        if url.endswith("/Release"):
            return io.BytesIO(rel_text)
        if "/binary-amd64/" in url:
            return io.BytesIO(served)
        return io.BytesIO(b"package bytes")

    entries = archive.fetch_index("http://127.0.0.1:1/debian", "bookworm", keyrings=[], fetch=fetch,
                                  insecure=True)
    for entry in entries[:3]:
        archive.download("http://127.0.0.1:1/debian", entry, tmp / "out" / "p.deb", fetch=fetch)


@st.composite
def archive_input(draw) -> bytes:
    suffix = draw(st.sampled_from(["", ".xz", ".gz"]))
    size = draw(st.sampled_from(["@SIZE", "@SIZE", "0", "x", "-1"]))
    sha = draw(st.sampled_from(["@SHA", "@SHA", "@SHA", "0" * 64, "zz"]))
    rel = (f"Suite: bookworm\nAcquire-By-Hash: {draw(st.sampled_from(['yes', 'no']))}\nSHA256:\n"
           f" {sha} {size} main/binary-amd64/Packages{suffix}\n")
    if draw(st.integers(0, 3)) == 0:
        rel = draw(deb822_text())
    body = draw(deb822_text())
    if draw(st.booleans()):
        body += ("\nPackage: p\nVersion: 1\nFilename: pool/p.deb\nSize: 13\nSHA256: "
                 + hashlib.sha256(b"package bytes").hexdigest() + "\n")
    tag = {".xz": b"X", ".gz": b"G", "": b"P"}[suffix]
    return rel.encode() + b"\0" + tag + body.encode()


def run_sources(data: bytes, tmp: Path) -> None:
    from forge.formats.debian import sources
    one, _, deb822 = data.partition(b"\0")
    apt = tmp / "in" / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_bytes(one)
    (apt / "sources.list.d" / "x.sources").write_bytes(deb822)
    found = sources.read_sources(apt)
    sources.debian_mirror(found)


_SOURCE_LINES = st.sampled_from([
    "deb http://127.0.0.1/debian bookworm main", "deb [arch=amd64 signed-by=/k.gpg] u s c",
    "deb [ unclosed u s", "deb-src u s", "deb", "deb\tu", "# c", "deb [a=b,c d+=e] u s",
    "Types: deb", "URIs: http://127.0.0.1/debian", "Suites: bookworm bookworm-updates",
    "Components: main", "Signed-By:", " -----BEGIN PGP PUBLIC KEY BLOCK-----", " .", " xx",
    "Enabled: no", "", ":", "Types deb"])

HARNESSES = [
    Harness("deb_package", run_deb, (DebError,), seeded([], deb_file()), examples=80),
    Harness("deb822_release", run_deb822, (DebError,),
            seeded([_control_sample()], text(deb822_text())), files=False),
    Harness("debian_archive", run_archive, (DebError,), seeded([], archive_input()), examples=80),
    Harness("apt_sources", run_sources, (),
            seeded([b"deb http://127.0.0.1/debian bookworm main\0Types: deb\nURIs: x\nSuites: s\n"],
                   st.tuples(text(st.lists(_SOURCE_LINES, max_size=5).map("\n".join)),
                             text(st.lists(_SOURCE_LINES, max_size=8).map("\n".join)))
                   .map(b"\0".join))),
]
