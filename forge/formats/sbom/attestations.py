"""The SPDX SBOMs an OCI layout carries as attestations, the way BuildKit attaches them:
beside each image manifest in the index, a manifest with platform unknown/unknown and the
annotations `vnd.docker.reference.type: attestation-manifest` and
`vnd.docker.reference.digest: <the image's digest>`, whose layers are in-toto Statements
(`application/vnd.in-toto+json`) annotated with `in-toto.io/predicate-type`. The SPDX ones
have the SPDX document as their predicate. Every blob is checked against its digest.
"""

from __future__ import annotations

import json
from pathlib import Path

from forge.formats.image.errors import LayoutError
from forge.formats.image.layout import load_index, load_json, read_blob

ATTESTATION = "attestation-manifest"
SPDX_PREDICATES = ("https://spdx.dev/Document", "https://spdx.dev/Document/v2.3")


def spdx_documents(layout: Path, image_digest: str | None = None) -> list[dict]:
    """The SPDX documents attested for `image_digest` (None: for any image) in `layout`."""
    layout = Path(layout)
    out = []
    for desc in _all_descriptors(layout, load_index(layout)):
        ann = desc.get("annotations") or {}
        if ann.get("vnd.docker.reference.type") != ATTESTATION:
            continue
        if image_digest and ann.get("vnd.docker.reference.digest") not in (None, image_digest):
            continue
        manifest = load_json(layout, desc["digest"], "manifest")
        for layer in manifest.get("layers", []):
            kind = (layer.get("annotations") or {}).get("in-toto.io/predicate-type", "")
            if kind not in SPDX_PREDICATES:
                continue
            try:
                statement = json.loads(read_blob(layout, layer))
            except ValueError as e:
                raise LayoutError(f"{layout}: attestation {layer['digest']} is not JSON: {e}") from None
            pred = statement.get("predicate") if isinstance(statement, dict) else None
            if isinstance(pred, dict) and str(pred.get("spdxVersion", "")).startswith("SPDX-2"):
                out.append(pred)
    return out


def _all_descriptors(layout: Path, index: dict, depth: int = 0) -> list[dict]:
    out = []
    for d in index.get("manifests", []):
        out.append(d)
        if "index" in d.get("mediaType", "") and depth < 4:
            out += _all_descriptors(layout, load_json(layout, d["digest"], "index"), depth + 1)
    return out
