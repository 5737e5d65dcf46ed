"""Harnesses for binary and archive formats that come from registries and mirrors: image
layers (tar: paths, links, whiteouts, PAX headers), tar to cpio, OCI layouts (index,
manifest, config), image references, `.deb` (ar), deb822 / Release / Packages, and apt
sources. Each accepts only its domain's base error; the extractors are also checked for
writes outside their output directory (fuzzlib._escapes)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import shutil
from pathlib import Path

from hypothesis import strategies as st

from fuzz_strategies import (JSONISH, WORDS, fix_tar_checksums, json_bytes, mutated, seeded,
                             tar_archive, text)
from fuzzlib import Harness
from targets_engine import REPO, _read

from forge.formats.debian.errors import DebError
from forge.formats.image.errors import ImageError
from forge.formats.linux.errors import CpioError

LAYER_SEP = b"\0FORGE-FUZZ-LAYER\0"  # several layers in one input: whiteouts need two


def _layers(data: bytes) -> list[bytes]:
    return [p if p[:2] == b"\x1f\x8b" else fix_tar_checksums(p) for p in data.split(LAYER_SEP)][:4]


def _layer_files(data: bytes, tmp: Path) -> list[Path]:
    (tmp / "in").mkdir()
    paths = []
    for i, layer in enumerate(_layers(data)):
        paths.append(tmp / "in" / f"{i}.tar")
        paths[-1].write_bytes(layer)
    return paths


def run_layers(data: bytes, tmp: Path) -> None:
    from forge.formats.image.layer_read import apply_layers, resolve_paths
    from forge.formats.image.layer_write import flatten
    paths = _layer_files(data, tmp)
    out = tmp / "out"
    out.mkdir()
    resolve_paths(paths, ["a", "d/f", "l/x", "lnk", "h", "/etc/passwd"])
    flatten(paths, io.BytesIO(), mtime=0)
    apply_layers(paths, out)
    apply_layers(paths, out, include=lambda rel: rel.startswith("d"))  # COPY --from, twice


def run_cpio(data: bytes, tmp: Path) -> None:
    from forge.formats.linux import cpio
    tar = _layers(data)[0]
    cpio.write_tree_from_tar(io.BytesIO(tar), io.BytesIO(), mtime=0,
                             replace={"etc/hostname": b"x"}, drop=["d/e"])


_LAYERS = st.lists(tar_archive(), min_size=1, max_size=3).map(LAYER_SEP.join)


def _repo_tar() -> list[bytes]:
    """A real tree (examples/basic) as a layer, plain and gzipped."""
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(REPO / "examples" / "basic", arcname=".")
    return [buf.getvalue(), gzip.compress(buf.getvalue(), mtime=0)]


# ---- OCI layouts -------------------------------------------------------------------------

_MEDIA = st.sampled_from(["application/vnd.oci.image.index.v1+json",
                          "application/vnd.oci.image.manifest.v1+json",
                          "application/vnd.docker.distribution.manifest.v2+json",
                          "application/vnd.docker.distribution.manifest.list.v2+json",
                          "application/vnd.oci.image.config.v1+json",
                          "application/vnd.oci.image.layer.v1.tar+gzip", "text/plain", ""])
_DIGEST = st.sampled_from(["@M", "@C", "@L", "@I", "@D", "sha256:" + "0" * 64, "sha256:xyz",
                           "md5:00", "sha512:" + "0" * 128, "", "sha256:../../x", "sha256"])
_PLATFORM = st.fixed_dictionaries({}, optional={
    "os": st.sampled_from(["linux", "windows", "", None]),
    "architecture": st.sampled_from(["amd64", "arm64", 5, None]),
    "variant": st.sampled_from(["v8", None]), "os.version": WORDS})


def _descriptor(extra: dict | None = None):
    return st.fixed_dictionaries({"mediaType": _MEDIA, "digest": _DIGEST,
                                  "size": st.sampled_from([-1, 0, 2, 2**63, "@S", "3"])},
                                 optional={"platform": st.one_of(_PLATFORM, JSONISH),
                                           "annotations": st.dictionaries(WORDS, JSONISH, max_size=2),
                                           **(extra or {})})


_INDEX = st.fixed_dictionaries({"schemaVersion": st.sampled_from([2, 1, "2"]),
                                "manifests": st.one_of(st.lists(_descriptor(), max_size=3), JSONISH)},
                               optional={"mediaType": _MEDIA})
_MANIFEST = st.fixed_dictionaries({"schemaVersion": st.sampled_from([2, 1]),
                                   "config": st.one_of(_descriptor(), JSONISH),
                                   "layers": st.one_of(st.lists(_descriptor(), max_size=3), JSONISH)},
                                  optional={"mediaType": _MEDIA, "subject": _descriptor()})
_CONFIG = st.fixed_dictionaries({}, optional={
    "architecture": st.sampled_from(["amd64", "arm64", 1]), "os": st.sampled_from(["linux", None]),
    "config": st.one_of(st.fixed_dictionaries({}, optional={
        "Env": st.lists(WORDS, max_size=3), "Cmd": JSONISH, "Entrypoint": JSONISH,
        "Labels": JSONISH, "WorkingDir": WORDS, "User": WORDS}), JSONISH),
    "rootfs": st.one_of(st.fixed_dictionaries({"type": st.just("layers"),
                                               "diff_ids": st.lists(_DIGEST, max_size=2)}), JSONISH)})
_LAYOUT = st.tuples(json_bytes(_INDEX), json_bytes(_MANIFEST), json_bytes(_CONFIG),
                    json_bytes(_INDEX)).map(b"\0".join)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _write_layout(data: bytes, tmp: Path) -> Path:
    """index.json, a manifest, a config and a nested index from the input; "@M", "@C",
    "@L" and "@I" stand for the digests of the manifest, config, a layer and the nested
    index, "@S" for the size of the manifest, so that the documents find each other."""
    from forge.formats.image import layout
    parts = (data.split(b"\0") + [b"", b"", b"", b""])[:4]
    index, manifest, config, nested = parts
    layer = gzip.compress(b"\0" * 1024, mtime=0)
    config = config.replace(b'"@D"', json.dumps(_sha(b"\0" * 1024)).encode())
    subs = {b'"@C"': config, b'"@L"': layer}
    for k, v in subs.items():
        manifest = manifest.replace(k, json.dumps(_sha(v)).encode())
    for doc in ("nested", "index"):
        text_ = nested if doc == "nested" else index
        text_ = text_.replace(b'"@M"', json.dumps(_sha(manifest)).encode()) \
            .replace(b'"@S"', str(len(manifest)).encode()).replace(b'"@C"', json.dumps(_sha(config)).encode())
        if doc == "index":
            text_ = text_.replace(b'"@I"', json.dumps(_sha(nested)).encode())
            index = text_
        else:
            nested = text_
    root = tmp / "layout"
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_bytes(index)
    for blob in (manifest, config, layer, nested):
        (blobs / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    return root


def run_layout(data: bytes, tmp: Path) -> None:
    from forge.formats.image import layout
    root = _write_layout(data, tmp)
    layout.verify_layout(root)
    for platform in ("linux/amd64", None, "linux/arm64/v8"):
        try:
            img = layout.read_image(root, platform)
        except ImageError:
            continue
        for desc, _path in img.layers:
            layout.read_blob(root, desc)


def run_image_archive(data: bytes, tmp: Path) -> None:
    """`import_archive` of a tarball built from the input: a docker save archive ("D"
    first: manifest.json and the config, "@C" standing for the config's member name) or
    an OCI layout tarball (the four documents of run_layout)."""
    import tarfile
    from forge.formats.image import archive
    kind, body = data[:1], data[1:]
    layer = _repo_tar()[0][:10240] + b"\0" * 1024
    if kind == b"D":
        manifest, _, config = body.partition(b"\0")
        config = config.replace(b'"@D"', json.dumps(_sha(layer)).encode())
        files = {"manifest.json": manifest.replace(b'"@C"', b'"config.json"'), "config.json": config,
                 "layer.tar": layer}
    else:
        _write_layout(body, tmp)
        files = {str(p.relative_to(tmp / "layout")): p.read_bytes()
                 for p in (tmp / "layout").rglob("*") if p.is_file()}
        shutil.rmtree(tmp / "layout")
    (tmp / "in").mkdir()
    with tarfile.open(tmp / "in" / "image.tar", "w") as tf:
        for name, blob in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))
    archive.import_archive(tmp / "in" / "image.tar", tmp / "out")


_DOCKER_ENTRY = st.fixed_dictionaries({"Config": st.sampled_from(["@C", "nosuch", 5, None]),
                                       "Layers": st.one_of(st.just(["layer.tar"]), st.lists(WORDS, max_size=2), JSONISH)},
                                      optional={"RepoTags": st.one_of(st.lists(st.sampled_from(
                                          ["redis:7", "a", "", "x:y:z", "localhost:5000/a:b"]), max_size=2), JSONISH)})
_DOCKER_CONFIG = st.fixed_dictionaries({"rootfs": st.one_of(st.fixed_dictionaries({
    "diff_ids": st.lists(_DIGEST, min_size=0, max_size=2)}), JSONISH)},
    optional={"os": st.sampled_from(["linux", 5]), "architecture": st.sampled_from(["amd64", None])})
_IMAGE_ARCHIVE = st.one_of(
    st.tuples(json_bytes(st.one_of(st.lists(_DOCKER_ENTRY, min_size=1, max_size=2), JSONISH)),
              json_bytes(_DOCKER_CONFIG)).map(lambda t: b"D" + b"\0".join(t)),
    _LAYOUT.map(lambda b: b"O" + b))


def run_reference(data: bytes, tmp: Path) -> None:
    from forge.formats.image.reference import Reference
    ref = Reference.parse(data.decode("utf-8", "replace"))
    Reference.parse(str(ref.reference))  # what it prints, it reads back


_REFS = st.lists(st.sampled_from(["docker.io", "localhost:5000", "[::1]:5000", "127.0.0.1",
                                  "/", "library", "redis", ":", "7", "@", "sha256:" + "a" * 64,
                                  "A", "-", "_", "..", "x" * 130, ":99999", "é", "//"]),
                 max_size=6).map("".join)

# ---- Debian ------------------------------------------------------------------------------


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
    import tarfile
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
    Harness("image_layers", run_layers, (ImageError,), seeded(_repo_tar(), _LAYERS), examples=80, writes=True),
    Harness("tar_to_cpio", run_cpio, (ImageError, CpioError), seeded(_repo_tar(), tar_archive()), examples=80, files=False),
    Harness("oci_layout", run_layout, (ImageError,),
            seeded([], st.one_of(_LAYOUT, mutated(_LAYOUT))), examples=100),
    Harness("image_archive", run_image_archive, (ImageError,),
            seeded([], st.one_of(_IMAGE_ARCHIVE, mutated(_IMAGE_ARCHIVE))), examples=80),
    Harness("image_reference", run_reference, (ImageError,),
            seeded([b"docker.io/library/redis:7", b"localhost:5000/a/b@sha256:" + b"a" * 64],
                   text(_REFS)), files=False),
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
