"""OCI image layouts: the one place that writes and reads them.

An OCI image layout (image-spec `image-layout.md`) is a directory:

    oci-layout               {"imageLayoutVersion": "1.0.0"}
    index.json               an image index: descriptors of manifests (or nested indexes)
    blobs/sha256/<hex>       every blob, named by the sha256 of its bytes

A descriptor is {mediaType, digest, size} plus optional platform and annotations. A
manifest names one config blob and the layer blobs in order; the config's
`rootfs.diff_ids` lists the sha256 of each layer *uncompressed*, which is how a gzip
layer is tied to the filesystem it carries. Everything forge writes here is canonical
JSON (sorted keys, no spaces), so the same image always gives the same digests.

What forge reads from a layout was written by someone else: digests are checked before
they name a path, nested indexes are followed only so deep, and `verify_layout` checks
every blob and diff_id a layout reaches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

from forge.formats.common.compression import CompressionError, open_decompressed
from forge.formats.common.files import atomic_write, canonical_json
from forge.formats.image.errors import LayoutError
from forge.formats.image.spec import (INDEX_TYPES, LAYOUT_VERSION, MANIFEST_TYPES, MAX_NESTING,
                                      OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, REF_NAME, Descriptor,
                                      check_document,
                                      digest_of, parse_platform, platform_dict, platform_matches,
                                      platform_str, split_digest)

_CHUNK = 1 << 20


@dataclass
class Image:
    """One image read from a layout: its manifest, config and layer blobs."""

    layout: Path
    index: dict  # the layout's index.json
    manifest: dict
    manifest_digest: str
    config: dict
    config_digest: str
    layers: list[tuple[dict, Path]] = field(default_factory=list)  # (descriptor, blob)


# ---- blobs --------------------------------------------------------------------------

def init_layout(layout: Path) -> Path:
    layout = Path(layout)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    if not (layout / "oci-layout").exists():
        atomic_write(layout / "oci-layout", canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
    return layout


def blob_path(layout: Path, digest: str) -> Path:
    algo, hexd = split_digest(digest)  # raises before an untrusted digest names a path
    return Path(layout) / "blobs" / algo / hexd


def store_stream(layout: Path, src: BinaryIO, expect: str | None = None) -> tuple[str, int]:
    """Copy a stream into the layout as a blob, hashing on the way; (digest, size)."""
    d = init_layout(layout) / "blobs" / "sha256"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    sha, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                sha.update(chunk)
                size += len(chunk)
                out.write(chunk)
        digest = f"sha256:{sha.hexdigest()}"
        if expect is not None and digest != expect:
            raise LayoutError(f"blob {expect} has digest {digest}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, d / sha.hexdigest())
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest, size


def add_blob(layout: Path, data: bytes | Path,
             media_type: str = "application/octet-stream") -> Descriptor:
    """Store bytes or a file as a blob. A file is hardlinked when it can be (so it must
    not be modified in place afterwards), else copied."""
    d = init_layout(layout) / "blobs" / "sha256"
    if isinstance(data, (bytes, bytearray)):
        hexd = hashlib.sha256(data).hexdigest()
        if not (d / hexd).exists():
            atomic_write(d / hexd, bytes(data))
        return Descriptor(media_type, f"sha256:{hexd}", len(data))
    sha = hashlib.sha256()
    with open(data, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    hexd, size = sha.hexdigest(), os.path.getsize(data)
    if not (d / hexd).exists():
        tmp = d / f".tmp-{os.urandom(8).hex()}"
        try:
            try:
                os.link(data, tmp)
            except OSError:  # another filesystem, or links not allowed
                shutil.copyfile(data, tmp)
            os.replace(tmp, d / hexd)
        finally:
            tmp.unlink(missing_ok=True)
    return Descriptor(media_type, f"sha256:{hexd}", size)


def load_json(layout: Path, digest: str, kind: str | None = None) -> dict:
    """A JSON blob; with `kind` ("index", "manifest", "config"), checked to have its shape."""
    try:
        doc = json.loads(blob_path(layout, digest).read_bytes())
    except FileNotFoundError:
        raise LayoutError(f"{layout}: blob {digest} is missing") from None
    except ValueError as e:  # UnicodeDecodeError too
        raise LayoutError(f"{layout}: blob {digest} is not JSON: {e}") from None
    return check_document(doc, kind, f"{layout}: blob {digest}") if kind else doc


def load_index(layout: Path) -> dict:
    try:
        doc = json.loads((Path(layout) / "index.json").read_bytes())
    except FileNotFoundError:
        raise LayoutError(f"{layout} is not an OCI image layout: no index.json") from None
    except ValueError as e:
        raise LayoutError(f"{layout}/index.json is not JSON: {e}") from None
    return check_document(doc, "index", f"{layout}/index.json")


def put_blob(layout: Path, digest: str, data: bytes) -> None:
    """Store bytes the caller has already checked against `digest` (any algorithm)."""
    path = blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def read_blob(layout: Path, desc: dict) -> bytes:
    """The bytes a descriptor names, checked against its digest."""
    try:
        digest = desc["digest"]
        data = blob_path(layout, digest).read_bytes()
    except (KeyError, TypeError, OSError) as e:
        raise LayoutError(f"{layout}: cannot read the blob a descriptor points to ({e}): the "
                          "layout is incomplete") from None
    if digest_of(data, split_digest(digest)[0]) != digest:
        raise LayoutError(f"{layout}: blob {digest} does not hash to its name: the layout is "
                          "corrupt")
    return data


# ---- writing and reading images -----------------------------------------------------

def descriptor_dict(layer) -> dict:
    if isinstance(layer, dict):
        return {k: layer[k] for k in ("mediaType", "digest", "size", "annotations") if k in layer}
    return {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}


def write_index(layout: Path, manifests: list[Descriptor]) -> None:
    """index.json listing `manifests`, nothing else."""
    write_index_document(layout, {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                  "manifests": [m.to_dict() for m in manifests]})


def write_index_document(layout: Path, index: dict) -> None:
    """index.json as given (an imported one keeps its annotations), in canonical JSON."""
    init_layout(layout)
    atomic_write(Path(layout) / "index.json", canonical_json(index))


def write_image(layout: Path, config: dict, layers: list, *, annotations: dict | None = None,
                platform=("linux", "amd64"), ref_name: str | None = None,
                append: bool = False) -> Descriptor:
    """Write config, manifest and index.json for layers already stored as blobs.

    `layers` are LayerInfo, Descriptor or descriptor dicts; when the config has no
    rootfs and every layer knows its diff_id, the rootfs is filled in. index.json then
    lists just this manifest, or, with `append`, replaces only the entry of the same
    platform and ref name.
    """
    if "rootfs" not in config and all(hasattr(x, "diff_id") for x in layers):
        config = {**config, "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]}}
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(layers):
        raise LayoutError(f"config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
    for want, x in zip(diff_ids, layers):
        if getattr(x, "diff_id", want) != want:
            raise LayoutError(f"layer {x.digest} has diff_id {x.diff_id}, the config says {want}")
    cfg = add_blob(layout, canonical_json(config), OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": descriptor_dict(cfg), "layers": [descriptor_dict(x) for x in layers]}
    if annotations:
        manifest["annotations"] = annotations
    m = add_blob(layout, canonical_json(manifest), OCI_MANIFEST)
    desc = Descriptor(m.media_type, m.digest, m.size, platform_dict(platform),
                      {REF_NAME: ref_name} if ref_name else None)
    entries = []
    if append and (Path(layout) / "index.json").exists():
        entries = [Descriptor.from_dict(d) for d in load_index(layout).get("manifests", [])
                   if (d.get("platform"), (d.get("annotations") or {}).get(REF_NAME))
                   != (desc.platform, ref_name)]
    write_index(layout, entries + [desc])
    return desc


def _candidates(layout: Path, index: dict, depth: int = 0) -> list[tuple[dict, dict]]:
    """(manifest descriptor, platform) for every image manifest an index reaches."""
    if depth > MAX_NESTING:
        raise LayoutError(f"{layout}: image indexes nested more than {MAX_NESTING} deep")
    out = []
    for d in index.get("manifests", []):
        if d.get("mediaType") in INDEX_TYPES:
            out += _candidates(layout, load_json(layout, d["digest"], "index"), depth + 1)
        elif d.get("mediaType") in MANIFEST_TYPES:
            p = d.get("platform")
            if not p:  # single-platform layouts often omit it: the config knows
                manifest = load_json(layout, d["digest"], "manifest")
                cfg = load_json(layout, manifest["config"]["digest"], "config")
                p = {k: cfg[k] for k in ("os", "architecture", "variant") if cfg.get(k)}
            out.append((d, p))
    return out


def read_image(layout: Path, platform: str | None = "linux/amd64") -> Image:
    """The image for `platform` (None: the only one) in a layout, nested indexes followed."""
    layout = Path(layout)
    index = load_index(layout)
    cands = _candidates(layout, index)
    if platform is None:
        chosen = list({d["digest"]: (d, p) for d, p in cands}.values())
        if len(chosen) != 1:
            raise LayoutError(f"{layout} holds {len(chosen)} images; name a platform")
    else:
        chosen = [(d, p) for d, p in cands if platform_matches(p, parse_platform(platform))]
    if not chosen:
        have = ", ".join(sorted({platform_str(p) for _, p in cands})) or "none"
        raise LayoutError(f"{layout} has no image for platform {platform}; available: {have}")
    desc = chosen[0][0]
    manifest = load_json(layout, desc["digest"], "manifest")
    config = load_json(layout, manifest["config"]["digest"], "config")
    layers = [(d, blob_path(layout, d["digest"])) for d in manifest.get("layers", [])]
    return Image(layout, index, manifest, desc["digest"], config, manifest["config"]["digest"],
                 layers)


# ---- verification -------------------------------------------------------------------

class _HashReader:
    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.size += len(b)
        return b

    def seekable(self) -> bool:
        return False


def hash_layer(path: Path) -> tuple[str, int, str]:
    """(digest, size, digest of the uncompressed bytes: the diff_id) of a layer blob."""
    with open(path, "rb") as f:
        hr = _HashReader(f)
        diff = hashlib.sha256()
        try:
            stream = open_decompressed(hr, f"layer blob {path}")
            while chunk := stream.read(_CHUNK):
                diff.update(chunk)
        except CompressionError as e:
            raise LayoutError(str(e)) from None
        while hr.read(_CHUNK):  # anything the decoder did not need still counts
            pass
    return f"sha256:{hr.sha.hexdigest()}", hr.size, f"sha256:{diff.hexdigest()}"


def _check_blob(layout: Path, d: dict, layer: bool = False) -> str | None:
    p = blob_path(layout, d["digest"])
    if not p.is_file():
        raise LayoutError(f"{layout}: blob {d['digest']} ({d.get('mediaType')}) is missing")
    if layer:
        digest, size, diff_id = hash_layer(p)
    else:
        data = p.read_bytes()
        digest, size, diff_id = f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), None
    if digest != d["digest"] or size != d["size"]:
        raise LayoutError(f"{layout}: blob {d['digest']} does not match its descriptor "
                          f"(sha256 {digest}, {size} bytes, descriptor says {d['size']})")
    return diff_id


def verify_layout(layout: Path) -> None:
    """Check every blob the index reaches, and each layer (gzip, zstd or plain) against
    the config's diff_ids; raises LayoutError naming the first bad blob."""
    layout = Path(layout)
    try:
        version = json.loads((layout / "oci-layout").read_bytes())["imageLayoutVersion"]
    except (FileNotFoundError, ValueError, KeyError):
        raise LayoutError(f"{layout}: missing or invalid oci-layout file") from None
    if version != LAYOUT_VERSION:
        raise LayoutError(f"{layout}: unsupported imageLayoutVersion {version!r}")
    seen: set[str] = set()

    def walk(index: dict, depth: int) -> None:
        if depth > MAX_NESTING:
            raise LayoutError(f"{layout}: image indexes nested more than {MAX_NESTING} deep")
        for d in index.get("manifests", []):
            if d["digest"] in seen:
                continue
            seen.add(d["digest"])
            _check_blob(layout, d)
            if d.get("mediaType") in INDEX_TYPES:
                walk(load_json(layout, d["digest"], "index"), depth + 1)
            elif d.get("mediaType") in MANIFEST_TYPES:
                manifest(d["digest"])

    def manifest(digest: str) -> None:
        m = load_json(layout, digest, "manifest")
        _check_blob(layout, m["config"])
        config = load_json(layout, m["config"]["digest"], "config")
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        if len(diff_ids) != len(m.get("layers", [])):
            raise LayoutError(f"{layout}: manifest {digest} has {len(m.get('layers', []))} "
                              f"layers but its config lists {len(diff_ids)} diff_ids")
        for d, want in zip(m.get("layers", []), diff_ids):
            got = _check_blob(layout, d, layer=True)
            if got != want:
                raise LayoutError(f"{layout}: layer blob {d['digest']} uncompresses to {got}, "
                                  f"but the config's diff_id is {want}")

    walk(load_index(layout), 0)


def image_config_defaults(*, diff_ids: Iterable[str] = (), platform: str = "linux/amd64",
                          env: list[str] | dict | None = None, cmd: list[str] | None = None,
                          entrypoint: list[str] | None = None, working_dir: str | None = None,
                          user: str | None = None, labels: dict | None = None,
                          exposed_ports: Iterable[str | int] | None = None,
                          history: list[dict] | None = None,
                          created: str | None = None) -> dict:
    """A minimal image config; no `created` unless given, so it stays reproducible."""
    os_, arch, variant = parse_platform(platform)
    if isinstance(env, dict):
        env = [f"{k}={v}" for k, v in env.items()]
    ports = {(p if "/" in str(p) else f"{p}/tcp"): {} for p in exposed_ports or ()}
    inner = {"Env": env, "Cmd": cmd, "Entrypoint": entrypoint, "WorkingDir": working_dir,
             "User": user, "Labels": labels, "ExposedPorts": ports or None}
    config = {"architecture": arch, "os": os_,
              "config": {k: v for k, v in inner.items() if v is not None},
              "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}
    if variant:
        config["variant"] = variant
    if history is not None:
        config["history"] = history
    if created is not None:
        config["created"] = created
    return config


def merge_layouts(out: Path, layouts: Iterable[Path]) -> list[Descriptor]:
    """One layout whose index.json lists the manifests of every layout in `layouts`, each
    with its platform (a multi-platform image); blobs are linked where they can be. Two
    manifests of the same platform are refused: a reader could not choose."""
    entries: list[Descriptor] = []
    seen: dict[str, Path] = {}
    for src in layouts:
        src = Path(src)
        for d, p in _candidates(src, load_index(src)):
            key = platform_str(p)
            if key in seen:
                raise LayoutError(f"{src} and {seen[key]} both hold an image for {key}")
            seen[key] = src
            _link_blobs(src, out)
            entries.append(Descriptor(d.get("mediaType", OCI_MANIFEST), d["digest"], d["size"],
                                      p))
    write_index(out, entries)
    return entries


def _link_blobs(src: Path, out: Path) -> None:
    """Every blob of `src` into `out` under its name (forge wrote and checked them)."""
    d = init_layout(out) / "blobs" / "sha256"
    for blob in sorted((Path(src) / "blobs" / "sha256").iterdir()):
        if blob.name.startswith(".") or (d / blob.name).exists():
            continue
        try:
            os.link(blob, d / blob.name)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(blob, d / blob.name)
