"""Layers compressed by the real tools (several gzip members, several zstd frames) through
every path of the image domain that decodes: extraction, normalising, flattening, layout
verification and diff_ids, docker-save export."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from compressed_streams import big_tar, compressed_by_tools
from forge.formats.image.archive import export_docker_archive
from forge.formats.image.errors import LayoutError
from forge.formats.image.layer_read import apply_layers, safe_extract
from forge.formats.image.layer_write import flatten, normalise
from forge.formats.image.layout import (add_blob, hash_layer, image_config_defaults, read_image,
                                        verify_layout, write_image)
from forge.formats.image.spec import OCI_LAYER_GZIP, OCI_LAYER_ZSTD

pytestmark = pytest.mark.real  # the zstd, pzstd and pigz commands

NAMES = ["zstd-two-frames", "zstd-T2-long", "pzstd", "gzip-cat", "pigz-cat"]


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    data = big_tar()
    return data, compressed_by_tools(data, tmp_path_factory.mktemp("layers"))


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return sorted(m.name for m in tf)


def _media(name: str) -> str:
    return OCI_LAYER_GZIP if "gz" in name or "pigz" in name else OCI_LAYER_ZSTD


@pytest.mark.parametrize("name", NAMES)
def test_extract_normalise_and_flatten_read_every_member(tmp_path, layers, name):
    data, blobs = layers
    blob = tmp_path / "layer"
    blob.write_bytes(blobs[name])
    safe_extract(blob, tmp_path / "x")
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        last = [m for m in tf][-1]
        assert (tmp_path / "x" / last.name).read_bytes() == tf.extractfile(last).read()
    apply_layers([io.BytesIO(blobs[name])], tmp_path / "y")  # a stream, not a path
    assert sorted(p.relative_to(tmp_path / "y").as_posix() for p in (tmp_path / "y").rglob("f*")) \
        == sorted(n for n in _names(data) if "/f" in n)
    out = io.BytesIO()
    normalise(blob, out, mtime=0, compress=False)
    assert _names(out.getvalue()) == _names(data)
    flat = io.BytesIO()
    flatten([blob], flat, mtime=0)
    assert set(_names(data)) <= set(_names(flat.getvalue()))


@pytest.mark.parametrize("name", NAMES)
def test_a_layout_with_such_layers_verifies_and_exports(tmp_path, layers, name):
    data, blobs = layers
    layout = tmp_path / "img"
    desc = add_blob(layout, blobs[name], _media(name))
    assert hash_layer(layout / "blobs" / "sha256" / desc.digest.split(":")[1])[2] == sha(data)
    write_image(layout, image_config_defaults(diff_ids=[sha(data)]), [desc])
    verify_layout(layout)
    with open(tmp_path / "save.tar", "wb") as f:
        export_docker_archive(layout, f, ["forge/test:v1"])
    with tarfile.open(tmp_path / "save.tar") as tf:
        layer = tf.extractfile(f"{sha(data).split(':')[1]}/layer.tar").read()
    assert layer == data


@pytest.mark.parametrize("name", ["zstd-two-frames", "pzstd", "gzip-cat"])
def test_a_cut_or_inconsistent_layer_fails_verification(tmp_path, layers, name):
    data, blobs = layers
    for n, (blob, diff_id, message) in enumerate([
            (blobs[name][:len(blobs[name]) * 3 // 4], sha(data), "truncated"),
            (blobs[name], sha(data[:-512]), "uncompresses to")]):
        layout = tmp_path / f"img{n}"
        desc = add_blob(layout, blob, _media(name))
        write_image(layout, image_config_defaults(diff_ids=[diff_id]), [desc])
        with pytest.raises(LayoutError, match=message):
            verify_layout(layout)
    with pytest.raises(LayoutError, match="truncated"):
        safe_extract(io.BytesIO(blobs[name][:len(blobs[name]) // 2]), tmp_path / "cut")
    assert read_image(tmp_path / "img1").config["rootfs"]["diff_ids"] == [sha(data[:-512])]
