"""Harnesses for what images are made of, from registries and users: layers (tar: paths,
links, whiteouts, PAX headers), tar to cpio, OCI layouts (index, manifest, config), image
archives (docker save, OCI tarballs) and references. Each accepts only its domain's base
error; the extractor is also checked for writes outside its output directory
(fuzzlib._escapes)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
from pathlib import Path

from hypothesis import strategies as st

from fuzz_strategies import (JSONISH, WORDS, fix_tar_checksums, json_bytes, mutated, seeded,
                             tar_archive, text)
from fuzzlib import Harness
from targets_engine import REPO

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
    out = tmp / "out"  # made by fuzzlib.run_case, which checks what happens around it
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
                                  "size": st.sampled_from([-1, 0, 2, 2**63, "@S", "3", "@CS", "@LS"])},
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
            .replace(b'"@S"', str(len(manifest)).encode()) \
            .replace(b'"@C"', json.dumps(_sha(config)).encode())
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


_TAGS = st.sampled_from(["redis:7", "a", "", "x:y:z", "localhost:5000/a:b"])
_DOCKER_ENTRY = st.fixed_dictionaries(
    {"Config": st.sampled_from(["@C", "nosuch", 5, None]),
     "Layers": st.one_of(st.just(["layer.tar"]), st.lists(WORDS, max_size=2), JSONISH)},
    optional={"RepoTags": st.one_of(st.lists(_TAGS, max_size=2), JSONISH)})
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

HARNESSES = [
    Harness("image_layers", run_layers, (ImageError,), seeded(_repo_tar(), _LAYERS),
            examples=80, writes=True),
    Harness("tar_to_cpio", run_cpio, (ImageError, CpioError), seeded(_repo_tar(), tar_archive()),
            examples=80, files=False),
    Harness("oci_layout", run_layout, (ImageError,),
            seeded([], st.one_of(_LAYOUT, mutated(_LAYOUT))), examples=60),
    Harness("image_archive", run_image_archive, (ImageError,),
            seeded([], st.one_of(_IMAGE_ARCHIVE, mutated(_IMAGE_ARCHIVE))), examples=80),
    Harness("image_reference", run_reference, (ImageError,),
            seeded([b"docker.io/library/redis:7", b"localhost:5000/a/b@sha256:" + b"a" * 64],
                   text(_REFS)), files=False),
]
