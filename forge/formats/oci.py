"""OCI image layouts, and the `docker save` / OCI tarballs that carry them.

An OCI image layout (image-spec `image-layout.md`) is a directory:

    oci-layout               {"imageLayoutVersion": "1.0.0"}
    index.json               an image index: descriptors of manifests (or nested indexes)
    blobs/sha256/<hex>       every blob, named by the sha256 of its bytes

A descriptor is {mediaType, digest, size} plus optional platform and annotations. A
manifest names one config blob and the layer blobs in order; the config's
`rootfs.diff_ids` lists the sha256 of each layer *uncompressed*, which is how a gzip
layer is tied to the filesystem it carries. Everything forge writes here is canonical
JSON (sorted keys, no spaces), so the same image always gives the same digests.

The legacy `docker save` archive (Docker engines before 25, e.g. Debian's 20.10) is a
tar holding `manifest.json` = [{"Config": "<hex>.json", "RepoTags": [...], "Layers":
["<id>/layer.tar", ...]}], the config file, one uncompressed tar per layer (a repeated
layer may be a symlink to an earlier one), and a `repositories` file that only
pre-manifest engines read. Engines 25+ write an OCI layout tarball instead (with a
`manifest.json` beside it for older tools); both are accepted here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

from forge.formats.layers import (MEDIA_TYPE_TAR, MEDIA_TYPE_TAR_GZIP, MEDIA_TYPE_TAR_ZSTD,
                                  UnsafeLayerError, open_decompressed)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = MEDIA_TYPE_TAR
OCI_LAYER_GZIP = MEDIA_TYPE_TAR_GZIP
OCI_LAYER_ZSTD = MEDIA_TYPE_TAR_ZSTD
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
REF_NAME = "org.opencontainers.image.ref.name"
IMAGE_NAME = "io.containerd.image.name"  # the full reference, as Docker 25+ writes it

_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_CHUNK = 1 << 20
_MAX_NESTING = 8


class LayoutError(Exception):
    """An image layout or archive is missing something, or a blob does not match."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict | None = None
    annotations: dict | None = None

    def to_dict(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            d["platform"] = self.platform
        if self.annotations:
            d["annotations"] = self.annotations
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Descriptor":
        return cls(d["mediaType"], d["digest"], d["size"], d.get("platform"), d.get("annotations"))


@dataclass
class Image:
    layout: Path
    index: dict  # the layout's index.json
    manifest: dict
    manifest_digest: str
    config: dict
    config_digest: str
    layers: list[tuple[dict, Path]] = field(default_factory=list)  # (descriptor, blob)


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_platform(platform: str | Iterable[str]) -> tuple[str, str, str | None]:
    """`linux/arm64/v8` or ("linux", "arm64", "v8") -> (os, architecture, variant)."""
    parts = platform.split("/") if isinstance(platform, str) else list(platform)
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform {platform!r} is not os/architecture[/variant]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _platform_dict(platform) -> dict:
    os_, arch, variant = parse_platform(platform)
    d = {"os": os_, "architecture": arch}
    if variant:
        d["variant"] = variant
    return d


def _platform_str(p: dict) -> str:
    return "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)


# ---- blobs --------------------------------------------------------------------------

def init_layout(layout: Path) -> Path:
    layout = Path(layout)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    if not (layout / "oci-layout").exists():
        _atomic_write(layout / "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
    return layout


def blob_path(layout: Path, digest: str) -> Path:
    # The digest comes from files we did not write: never let it name a path.
    if not _DIGEST.match(digest):
        raise LayoutError(f"invalid digest {digest!r}")
    algo, hexd = digest.split(":")
    return Path(layout) / "blobs" / algo / hexd


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _store_stream(layout: Path, src: BinaryIO, expect: str | None = None) -> tuple[str, int]:
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
            _atomic_write(d / hexd, bytes(data))
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


def _load_json(layout: Path, digest: str) -> dict:
    try:
        return json.loads(blob_path(layout, digest).read_bytes())
    except FileNotFoundError:
        raise LayoutError(f"{layout}: blob {digest} is missing") from None
    except ValueError as e:
        raise LayoutError(f"{layout}: blob {digest} is not JSON: {e}") from None


def _load_index(layout: Path) -> dict:
    try:
        return json.loads((Path(layout) / "index.json").read_bytes())
    except FileNotFoundError:
        raise LayoutError(f"{layout} is not an OCI image layout: no index.json") from None


# ---- writing and reading images -----------------------------------------------------

def _layer_dict(layer) -> dict:
    if isinstance(layer, dict):
        return {k: layer[k] for k in ("mediaType", "digest", "size", "annotations") if k in layer}
    return {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}


def write_index(layout: Path, manifests: list[Descriptor]) -> None:
    init_layout(layout)
    _atomic_write(Path(layout) / "index.json", canonical_json(
        {"schemaVersion": 2, "mediaType": OCI_INDEX,
         "manifests": [m.to_dict() for m in manifests]}))


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
                "config": _layer_dict(cfg), "layers": [_layer_dict(x) for x in layers]}
    if annotations:
        manifest["annotations"] = annotations
    m = add_blob(layout, canonical_json(manifest), OCI_MANIFEST)
    desc = Descriptor(m.media_type, m.digest, m.size, _platform_dict(platform),
                      {REF_NAME: ref_name} if ref_name else None)
    entries = []
    if append and (Path(layout) / "index.json").exists():
        entries = [Descriptor.from_dict(d) for d in _load_index(layout).get("manifests", [])
                   if (d.get("platform"), (d.get("annotations") or {}).get(REF_NAME))
                   != (desc.platform, ref_name)]
    write_index(layout, entries + [desc])
    return desc


def _candidates(layout: Path, index: dict, depth: int = 0) -> list[tuple[dict, dict]]:
    """(manifest descriptor, platform) for every image manifest an index reaches."""
    if depth > _MAX_NESTING:
        raise LayoutError(f"{layout}: image indexes nested more than {_MAX_NESTING} deep")
    out = []
    for d in index.get("manifests", []):
        if d.get("mediaType") in INDEX_TYPES:
            out += _candidates(layout, _load_json(layout, d["digest"]), depth + 1)
        elif d.get("mediaType") in MANIFEST_TYPES:
            p = d.get("platform")
            if not p:  # single-platform layouts often omit it: the config knows
                cfg = _load_json(layout, _load_json(layout, d["digest"])["config"]["digest"])
                p = {k: cfg[k] for k in ("os", "architecture", "variant") if cfg.get(k)}
            out.append((d, p))
    return out


def _matches(p: dict, want: tuple[str, str, str | None]) -> bool:
    os_, arch, variant = want
    have = p.get("variant") or ("v8" if p.get("architecture") == "arm64" else None)
    return p.get("os") == os_ and p.get("architecture") == arch and \
        (variant is None or variant == have)


def read_image(layout: Path, platform: str | None = "linux/amd64") -> Image:
    """The image for `platform` (None: the only one) in a layout, nested indexes followed."""
    layout = Path(layout)
    index = _load_index(layout)
    cands = _candidates(layout, index)
    if platform is None:
        chosen = list({d["digest"]: (d, p) for d, p in cands}.values())
        if len(chosen) != 1:
            raise LayoutError(f"{layout} holds {len(chosen)} images; name a platform")
    else:
        chosen = [(d, p) for d, p in cands if _matches(p, parse_platform(platform))]
    if not chosen:
        have = ", ".join(sorted({_platform_str(p) for _, p in cands})) or "none"
        raise LayoutError(f"{layout} has no image for platform {platform}; available: {have}")
    desc = chosen[0][0]
    manifest = _load_json(layout, desc["digest"])
    config = _load_json(layout, manifest["config"]["digest"])
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


def _hash_layer(path: Path) -> tuple[str, int, str | None]:
    """(digest, size, uncompressed digest or None when it cannot be decompressed)."""
    with open(path, "rb") as f:
        hr = _HashReader(f)
        diff = hashlib.sha256()
        try:
            stream = open_decompressed(hr)
            while chunk := stream.read(_CHUNK):
                diff.update(chunk)
            diff_id = f"sha256:{diff.hexdigest()}"
        except UnsafeLayerError:
            diff_id = None
        while hr.read(_CHUNK):
            pass
    return f"sha256:{hr.sha.hexdigest()}", hr.size, diff_id


def _check_blob(layout: Path, d: dict, layer: bool = False) -> str | None:
    p = blob_path(layout, d["digest"])
    if not p.is_file():
        raise LayoutError(f"{layout}: blob {d['digest']} ({d.get('mediaType')}) is missing")
    if layer:
        digest, size, diff_id = _hash_layer(p)
    else:
        data = p.read_bytes()
        digest, size, diff_id = f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), None
    if digest != d["digest"] or size != d["size"]:
        raise LayoutError(f"{layout}: blob {d['digest']} does not match its descriptor "
                          f"(sha256 {digest}, {size} bytes, descriptor says {d['size']})")
    return diff_id


def verify_layout(layout: Path) -> list[str]:
    """Check every blob the index reaches, and each layer against config diff_ids.

    Returns the digests of layers whose diff_id could not be checked (zstd without the
    zstandard module); raises LayoutError naming the first bad blob.
    """
    layout = Path(layout)
    try:
        version = json.loads((layout / "oci-layout").read_bytes())["imageLayoutVersion"]
    except (FileNotFoundError, ValueError, KeyError):
        raise LayoutError(f"{layout}: missing or invalid oci-layout file") from None
    if version != "1.0.0":
        raise LayoutError(f"{layout}: unsupported imageLayoutVersion {version!r}")
    unchecked: list[str] = []
    seen: set[str] = set()

    def walk(index: dict, depth: int) -> None:
        if depth > _MAX_NESTING:
            raise LayoutError(f"{layout}: image indexes nested more than {_MAX_NESTING} deep")
        for d in index.get("manifests", []):
            if d["digest"] in seen:
                continue
            seen.add(d["digest"])
            _check_blob(layout, d)
            if d.get("mediaType") in INDEX_TYPES:
                walk(_load_json(layout, d["digest"]), depth + 1)
            elif d.get("mediaType") in MANIFEST_TYPES:
                manifest(d["digest"])

    def manifest(digest: str) -> None:
        m = _load_json(layout, digest)
        _check_blob(layout, m["config"])
        diff_ids = _load_json(layout, m["config"]["digest"]).get("rootfs", {}).get("diff_ids", [])
        if len(diff_ids) != len(m.get("layers", [])):
            raise LayoutError(f"{layout}: manifest {digest} has {len(m.get('layers', []))} "
                              f"layers but its config lists {len(diff_ids)} diff_ids")
        for d, want in zip(m.get("layers", []), diff_ids):
            got = _check_blob(layout, d, layer=True)
            if got is None:
                unchecked.append(d["digest"])
            elif got != want:
                raise LayoutError(f"{layout}: layer blob {d['digest']} uncompresses to {got}, "
                                  f"but the config's diff_id is {want}")

    walk(_load_index(layout), 0)
    return unchecked


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


# Import and export of archives live in their own module; these names stay importable here.
from forge.formats.oci_archive import (export_docker_archive, export_oci_archive,  # noqa: E402,F401
                                       import_archive)
