"""`docker save` and OCI layout tarballs: importing them as OCI layouts, and exporting
layouts for `docker load` (engines before 25 read only the legacy format) or as OCI
tarballs.

The legacy `docker save` archive (Docker engines before 25, e.g. Debian's 20.10) is a
tar holding `manifest.json` = [{"Config": "<hex>.json", "RepoTags": [...], "Layers":
["<id>/layer.tar", ...]}], the config file, one uncompressed tar per layer (a repeated
layer may be a symlink to an earlier one), and a `repositories` file that only
pre-manifest engines read. Engines 25+ write an OCI layout tarball instead (with a
`manifest.json` beside it for older tools); both are accepted here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from forge.formats.common.compression import CompressionError, compression_of, open_decompressed
from forge.formats.common.files import canonical_json
from forge.formats.image.errors import LayoutError
from forge.formats.image.layout import (add_blob, blob_path, descriptor_dict, hash_layer,
                                        init_layout, load_index, load_json, read_image,
                                        store_stream, write_index, write_index_document)
from forge.formats.image.spec import (IMAGE_NAME, INDEX_TYPES, MANIFEST_TYPES, MAX_NESTING,
                                      OCI_CONFIG, OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD,
                                      OCI_MANIFEST, REF_NAME, Descriptor, check_document)

_CHUNK = 1 << 20

# ---- archives -----------------------------------------------------------------------

def _member_name(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def import_archive(tar_path: Path, layout: Path) -> Descriptor:
    """Turn a `docker save` or OCI layout tarball into `layout` (its index.json replaced).

    Returns the descriptor of the (first) image in the archive's index.
    """
    init_layout(layout)
    with tarfile.open(tar_path, "r:*") as tf:
        members = {_member_name(m.name): m for m in tf.getmembers()}
        if "oci-layout" in members and "index.json" in members:
            return _import_oci(tf, members, Path(layout), tar_path)
        if "manifest.json" in members:
            return _import_docker(tf, members, Path(layout), tar_path)
    raise LayoutError(f"{tar_path} is neither an OCI layout tarball (oci-layout, index.json) "
                      "nor a docker save archive (manifest.json)")


def _read_member(tf: tarfile.TarFile, members: dict, name: str, archive) -> BinaryIO:
    m = members.get(_member_name(name))
    f = tf.extractfile(m) if m is not None else None
    if f is None:
        raise LayoutError(f"{archive}: {name!r} is missing or not a file")
    return f


def _json(tf, members, name: str, archive):
    return _parse(_read_member(tf, members, name, archive).read(), f"{archive}: {name}")


def _parse(data: bytes, where: str):
    try:
        return json.loads(data)
    except ValueError as e:  # UnicodeDecodeError too
        raise LayoutError(f"{where} is not JSON: {e}") from None


def _strings(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _import_oci(tf, members, layout: Path, archive) -> Descriptor:
    for name, m in sorted(members.items()):
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "blobs" and m.isfile():
            store_stream(layout, tf.extractfile(m), expect=f"{parts[1]}:{parts[2]}")
    index = check_document(_json(tf, members, "index.json", archive), "index",
                           f"{archive}: index.json")
    if not index.get("manifests"):
        raise LayoutError(f"{archive}: index.json lists no manifests")
    for d in index["manifests"]:
        if not blob_path(layout, d["digest"]).is_file():
            raise LayoutError(f"{archive}: index.json names {d['digest']}, not in the archive")
    write_index_document(layout, index)
    return Descriptor.from_dict(index["manifests"][0])


def _import_docker(tf, members, layout: Path, archive) -> Descriptor:
    entries = _json(tf, members, "manifest.json", archive)
    if not isinstance(entries, list) or not entries:
        raise LayoutError(f"{archive}: manifest.json lists no images")
    for entry in entries:  # the shape `docker save` writes
        if not (isinstance(entry, dict) and isinstance(entry.get("Config"), str)
                and _strings(entry.get("Layers")) and _strings(entry.get("RepoTags") or [])):
            raise LayoutError(f"{archive}: manifest.json holds {json.dumps(entry)[:200]}, not an "
                              "image entry (Config: a member name, Layers and RepoTags: lists of "
                              "names)")
    descs = []
    for entry in entries:
        config_bytes = _read_member(tf, members, entry["Config"], archive).read()
        config = check_document(_parse(config_bytes, f"{archive}: {entry['Config']}"), "config",
                                f"{archive}: {entry['Config']}")
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        if len(diff_ids) != len(entry["Layers"]):
            raise LayoutError(f"{archive}: {len(entry['Layers'])} layers but the config "
                              f"lists {len(diff_ids)} diff_ids")
        cfg = add_blob(layout, config_bytes, OCI_CONFIG)  # kept byte for byte: the image ID
        layers = []
        for name, want in zip(entry["Layers"], diff_ids):
            digest, size = store_stream(layout, _read_member(tf, members, name, archive))
            path = blob_path(layout, digest)
            with open(path, "rb") as f:
                kind = compression_of(f.read(4))
            media = {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}.get(kind, OCI_LAYER)
            diff_id = digest if kind == "none" else hash_layer(path)[2]
            if diff_id != want:
                raise LayoutError(f"{archive}: layer {name} has diff_id {diff_id}, "
                                  f"the config says {want}")
            layers.append({"mediaType": media, "digest": digest, "size": size})
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": descriptor_dict(cfg), "layers": layers}
        m = add_blob(layout, canonical_json(manifest), OCI_MANIFEST)
        platform = {k: config[k] for k in ("os", "architecture", "variant") if config.get(k)}
        for tag in [_with_tag(t) for t in entry.get("RepoTags") or []] or [None]:
            ann = {IMAGE_NAME: tag, REF_NAME: tag.rsplit(":", 1)[1]} if tag else None
            descs.append(Descriptor(m.media_type, m.digest, m.size, platform or None, ann))
    write_index(layout, descs)
    return descs[0]


def _with_tag(ref: str) -> str:
    # `docker load` refuses RepoTags without a tag; ':' before the last '/' is a port.
    return ref if ":" in ref.rsplit("/", 1)[-1] else f"{ref}:latest"


def _write_archive(out: BinaryIO, files: dict[str, tuple[int, Callable[[], BinaryIO]]]) -> None:
    """A reproducible tar: parents as 0755 dirs, files 0644, all 0:0 at mtime 0, sorted."""
    names = set(files)
    for name in files:
        parts = name.split("/")
        names.update("/".join(parts[:i]) for i in range(1, len(parts)))
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(names, key=lambda n: n.split("/")):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if name in files:
                info.mode, info.size = 0o644, files[name][0]
                with files[name][1]() as f:
                    tf.addfile(info, f)
            else:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)


def _file(path: Path) -> tuple[int, Callable[[], BinaryIO]]:
    return os.path.getsize(path), lambda: open(path, "rb")


def _bytes(data: bytes) -> tuple[int, Callable[[], BinaryIO]]:
    return len(data), lambda: io.BytesIO(data)


def export_docker_archive(layout: Path, out_fileobj: BinaryIO, tags: list[str], *,
                          platform: str = "linux/amd64") -> None:
    """Write the image as a legacy `docker save` tarball, which every engine can load.

    Layers are stored uncompressed (checked against the config's diff_ids) under
    `<diff_id hex>/layer.tar`; the config keeps its bytes, so the image ID is its digest.
    """
    img = read_image(layout, platform)
    config_name = f"{img.config_digest.split(':')[1]}.json"
    files = {config_name: _file(blob_path(layout, img.config_digest))}
    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        for (desc, path), diff_id in zip(img.layers, img.config["rootfs"]["diff_ids"]):
            name = f"{diff_id.split(':')[1]}/layer.tar"
            paths.append(name)
            if name in files:
                continue
            if desc["digest"] == diff_id:
                files[name] = _file(path)
                continue
            plain = Path(tmp, diff_id.split(":")[1])
            sha = hashlib.sha256()
            with open(path, "rb") as src, open(plain, "wb") as dst:
                try:
                    stream = open_decompressed(src, f"{layout}: layer {desc['digest']}")
                    while chunk := stream.read(_CHUNK):
                        sha.update(chunk)
                        dst.write(chunk)
                except CompressionError as e:
                    raise LayoutError(str(e)) from None
            if f"sha256:{sha.hexdigest()}" != diff_id:
                raise LayoutError(f"{layout}: layer {desc['digest']} uncompresses to "
                                  f"sha256:{sha.hexdigest()}, not the diff_id {diff_id}")
            files[name] = _file(plain)
        tags = [_with_tag(t) for t in tags]
        files["manifest.json"] = _bytes(canonical_json(
            [{"Config": config_name, "RepoTags": tags, "Layers": paths}]))
        repos: dict = {}
        for t in tags:
            repo, tag = t.rsplit(":", 1)
            repos.setdefault(repo, {})[tag] = paths[-1].split("/")[0] if paths else ""
        files["repositories"] = _bytes(canonical_json(repos))
        _write_archive(out_fileobj, files)


def _reachable(layout: Path) -> set[str]:
    found: set[str] = set()

    def walk(d: dict, depth: int) -> None:
        if d["digest"] in found or depth > MAX_NESTING:
            return
        found.add(d["digest"])
        if d.get("mediaType") in INDEX_TYPES:
            for x in load_json(layout, d["digest"]).get("manifests", []):
                walk(x, depth + 1)
        elif d.get("mediaType") in MANIFEST_TYPES:
            m = load_json(layout, d["digest"])
            for x in [m["config"], *m.get("layers", [])]:
                if blob_path(layout, x["digest"]).exists() or "urls" not in x:
                    found.add(x["digest"])

    for d in load_index(layout).get("manifests", []):
        walk(d, 0)
    return found


def export_oci_archive(layout: Path, out_fileobj: BinaryIO) -> None:
    """Tar the layout reproducibly, with only the blobs its index reaches."""
    layout = Path(layout)
    files = {"oci-layout": _file(layout / "oci-layout"),
             "index.json": _file(layout / "index.json")}
    for digest in _reachable(layout):
        p = blob_path(layout, digest)
        if not p.is_file():
            raise LayoutError(f"{layout}: blob {digest} is missing")
        files[f"blobs/{digest.replace(':', '/')}"] = _file(p)
    _write_archive(out_fileobj, files)
