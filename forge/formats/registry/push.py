"""Pushing an OCI layout to a registry: blobs the registry lacks (HEAD, then a monolithic
POST+PUT upload), then the manifest, or every manifest and then the index for a
multi-platform layout. A layout that is incomplete or corrupt is a `LayoutError` of the
image domain, raised before anything is sent for that blob.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

from forge.formats.common.files import canonical_json
from forge.formats.image.errors import LayoutError
from forge.formats.image.layout import blob_path, read_blob
from forge.formats.image.reference import Reference
from forge.formats.image.spec import (INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST,
                                      REF_NAME, digest_of, split_digest)
from forge.formats.registry.auth import token_scope
from forge.formats.registry.errors import RegistryError, UnsupportedError, VerificationError
from forge.formats.registry.transport import Transport


def pushed_document(layout: Path, tag: str | None) -> tuple[bytes, str]:
    """The manifest or index that pushing `layout` under `tag` sends, and its media type:
    the entry named `tag`, else the only entry, else one index of the unnamed entries. Its
    digest is the pushed image's (what a signature over the layout must name)."""
    try:
        index = json.loads((layout / "index.json").read_bytes())
        descs = list(index["manifests"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LayoutError(f"{layout} is not an OCI image layout (index.json: {e}): build or "
                          "pull an image into it first") from None
    descs = images_of(descs)
    named = [d for d in descs if (d.get("annotations") or {}).get(REF_NAME) == tag]
    if len(named) == 1 or len(descs) == 1:
        desc = named[0] if len(named) == 1 else descs[0]
        body = read_blob(layout, desc)
        return body, desc.get("mediaType") or json.loads(body).get("mediaType") or OCI_MANIFEST
    if not descs:
        raise LayoutError(f"{layout}/index.json lists no manifests: nothing to push")
    children = []
    for d in descs:
        d = dict(d)
        ann = {k: v for k, v in (d.pop("annotations", None) or {}).items() if k != REF_NAME}
        children.append({**d, **({"annotations": ann} if ann else {})})
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                           "manifests": children}), OCI_INDEX


def images_of(descs: list[dict]) -> list[dict]:
    """An index's entries without the attestation manifests of other entries (which a pull
    keeps beside the image, docs/supply-chain.md): pushing or signing a pulled image is
    about the image, as before its attestations were kept."""
    digests = {d.get("digest") for d in descs}
    return [d for d in descs if not (
        (d.get("annotations") or {}).get("vnd.docker.reference.type") == "attestation-manifest"
        and (d.get("annotations") or {}).get("vnd.docker.reference.digest") in digests)]


class Pusher:
    """Images from a layout to a registry through one `Transport`."""

    def __init__(self, transport: Transport, max_workers: int = 4):
        self.t, self.max_workers = transport, max(1, max_workers)

    def push(self, layout_dir: Path | str, ref: Reference | str) -> str:
        """Push the image of an OCI layout and return the manifest digest the registry
        reports. The layout's entry named `ref.tag` (`org.opencontainers.image.ref.name`)
        is pushed, else its only entry; several unnamed entries are pushed as one index."""
        ref = Reference.of(ref)
        layout = Path(layout_dir)
        body, media = pushed_document(layout, ref.tag)
        ep = self.t.endpoint(ref.registry, ref.registry)
        if ref.digest and digest_of(body) != ref.digest:
            raise VerificationError(f"the image in {layout} has digest {digest_of(body)}, not the "
                                    f"{ref.digest} named by {ref}")
        return self._push_manifest(ep, ref, layout, body, media, ref.tag or digest_of(body))

    def _push_manifest(self, ep, ref, layout: Path, body: bytes, media: str, target: str) -> str:
        doc = json.loads(body)
        if media in INDEX_TYPES:
            for d in doc.get("manifests") or []:
                child = read_blob(layout, d)
                self._push_manifest(ep, ref, layout, child,
                                    d.get("mediaType") or json.loads(child).get("mediaType")
                                    or OCI_MANIFEST, d["digest"])
        elif media in MANIFEST_TYPES:
            blobs = {d["digest"]: d for d in [doc["config"], *(doc.get("layers") or [])]}
            with ThreadPoolExecutor(self.max_workers, thread_name_prefix="push") as pool:
                for f in [pool.submit(self._push_blob, ep, ref, layout, d)
                          for d in blobs.values()]:
                    f.result()
        else:
            raise UnsupportedError(f"cannot push media type {media!r}: not a manifest or index")
        sep = "@" if ":" in target else ":"
        r = self.t.request(ep, "PUT", f"/v2/{ref.repository}/manifests/{target}",
                          scope=token_scope(ref, push=True), ok=(200, 201),
                          what=f"manifest {ref.repository}{sep}{target}",
                          headers={"Content-Type": media}, body=body)
        sent = digest_of(body)
        reported = r.headers.get("Docker-Content-Digest") or sent
        if reported != sent:
            raise VerificationError(f"registry {ep.host} stored manifest {ref.repository}{sep}"
                                    f"{target} as {reported}, but the bytes sent hash to {sent}")
        return reported

    def _push_blob(self, ep, ref, layout: Path, desc: dict) -> None:
        digest, size = desc["digest"], int(desc["size"])
        scope, what = token_scope(ref, push=True), f"blob {digest}"
        head = self.t.request(ep, "HEAD", f"/v2/{ref.repository}/blobs/{digest}", scope=scope,
                             what=what, ok=(200, 404))
        if head.status == 200:
            return
        path = blob_path(layout, digest)
        if not path.is_file():
            raise LayoutError(f"{layout} lacks {what} that its manifest needs "
                              f"(expected {path}): the layout is incomplete")
        h, n = hashlib.new(split_digest(digest)[0]), 0
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        if n != size or f"{h.name}:{h.hexdigest()}" != digest:
            raise LayoutError(f"{path} is {n} bytes hashing to {h.name}:{h.hexdigest()}, but its "
                              f"descriptor says {size} bytes, {digest}: the layout is corrupt")
        post = self.t.request(ep, "POST", f"/v2/{ref.repository}/blobs/uploads/", scope=scope,
                             what=f"upload of {what}", ok=(202,), body=b"")
        location = post.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {ep.host} started an upload of {what} without a "
                                "Location header")
        u = urlsplit(urljoin(f"{ep.base}/v2/{ref.repository}/blobs/uploads/", location))
        query = (u.query + "&" if u.query else "") + urlencode({"digest": digest})
        url = u._replace(query=query).geturl()
        put = self.t.request(ep, "PUT", url, scope=scope, what=f"upload of {what}", ok=(201,),
                            headers={"Content-Type": "application/octet-stream"}, body=path)
        stored = put.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise VerificationError(f"registry {ep.host} stored {what} as {stored}")
