"""OCI 1.1 referrers: artifacts (signatures, attestations) attached to an image by a
`subject` field, and listing them again.

Attaching pushes an image manifest whose `artifactType` says what it is, whose config is
the empty descriptor (`{}`), whose layers are the artifact's blobs and whose `subject` is
the image's manifest descriptor. A registry with the referrers API indexes it (it answers
the manifest PUT with an `OCI-Subject` header); for one without (Debian's docker-registry,
distribution 2.8), the client keeps the index itself under the tag `sha256-<hex>` of the
subject, as the distribution spec's "referrers tag schema" says: GET it (absent: a new
index), add the descriptor, PUT it back.

Listing asks `GET /v2/<name>/referrers/<digest>` first; a 404 there means "no API" and the
fallback tag is read instead. Every manifest and blob fetched is checked against its digest.
"""

from __future__ import annotations

import json

from forge.formats.common.files import canonical_json
from forge.formats.image.reference import Reference
from forge.formats.image.spec import OCI_INDEX, OCI_MANIFEST, digest_of
from forge.formats.registry.auth import token_scope
from forge.formats.registry.errors import RegistryError, VerificationError
from forge.formats.registry.transport import Endpoint, Transport

ENVELOPE_TYPE = "application/vnd.dsse.envelope.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
EMPTY_DESCRIPTOR = {"mediaType": EMPTY_TYPE, "digest": digest_of(EMPTY), "size": 2,
                    "data": "e30="}
MAX_DOCUMENT = 4 << 20  # an index of referrers or an artifact manifest
MAX_BLOB = 64 << 20


def fallback_tag(digest: str) -> str:
    """`<alg>-<ref>`, the algorithm cut to 32 characters and the hex to 64 (the spec's
    limits, so a sha512 digest still makes a valid tag)."""
    algo, _, hexpart = digest.partition(":")
    return f"{algo[:32]}-{hexpart[:64]}"


def artifact_manifest(subject: dict, artifact_type: str, blobs: list[tuple[str, bytes, dict]],
                      annotations: dict | None = None) -> bytes:
    """The manifest bytes of an artifact: (media type, bytes, annotations) per blob."""
    layers = [{"mediaType": mt, "digest": digest_of(data), "size": len(data),
               **({"annotations": ann} if ann else {})} for mt, data, ann in blobs]
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
           "config": EMPTY_DESCRIPTOR, "layers": layers,
           "subject": {k: subject[k] for k in ("mediaType", "digest", "size")}}
    if annotations:
        doc["annotations"] = annotations
    return canonical_json(doc)


class Referrers:
    """Attach and list referrers through one `Transport`."""

    def __init__(self, transport: Transport):
        self.t = transport

    def _ep(self, ref: Reference) -> Endpoint:
        return self.t.endpoint(ref.registry, ref.registry)

    def _upload(self, ep: Endpoint, ref: Reference, data: bytes) -> None:
        from urllib.parse import urlencode, urljoin, urlsplit
        digest, scope = digest_of(data), token_scope(ref, push=True)
        head = self.t.request(ep, "HEAD", f"/v2/{ref.repository}/blobs/{digest}", scope=scope,
                              what=f"blob {digest}", ok=(200, 404))
        if head.status == 200:
            return
        post = self.t.request(ep, "POST", f"/v2/{ref.repository}/blobs/uploads/", scope=scope,
                              what=f"upload of blob {digest}", ok=(202,), body=b"")
        location = post.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {ep.host} started an upload of blob {digest} "
                                "without a Location header")
        u = urlsplit(urljoin(f"{ep.base}/v2/{ref.repository}/blobs/uploads/", location))
        query = (u.query + "&" if u.query else "") + urlencode({"digest": digest})
        self.t.request(ep, "PUT", u._replace(query=query).geturl(), scope=scope,
                       what=f"upload of blob {digest}", ok=(201,),
                       headers={"Content-Type": "application/octet-stream"}, body=data)

    def _put(self, ep, ref: Reference, target: str, body: bytes, media: str):
        return self.t.request(ep, "PUT", f"/v2/{ref.repository}/manifests/{target}",
                              scope=token_scope(ref, push=True), ok=(200, 201),
                              what=f"manifest {ref.repository}:{target}",
                              headers={"Content-Type": media}, body=body)

    def _get(self, ep, ref: Reference, reference: str, media: str, expect: str | None = None,
             limit: int = MAX_DOCUMENT) -> bytes | None:
        kind = "manifests" if media else "blobs"
        what = f"{kind[:-1]} {ref.repository}{'@' if ':' in reference else ':'}{reference}"
        r = self.t.request(ep, "GET", f"/v2/{ref.repository}/{kind}/{reference}",
                           scope=token_scope(ref, push=False), what=what, ok=(200, 404),
                           headers={"Accept": media} if media else None)
        if r.status == 404:
            return None
        if len(r.body) > limit:
            raise VerificationError(f"{what} from {ep.host} is {len(r.body)} bytes, more than "
                                    f"the {limit} accepted for it")
        if expect and digest_of(r.body) != expect:
            raise VerificationError(f"{what} from {ep.host} hashes to {digest_of(r.body)}, not "
                                    f"{expect}: the registry served other content")
        return r.body

    def attach(self, ref: Reference | str, subject: dict, artifact_type: str,
               blobs: list[tuple[str, bytes, dict]], annotations: dict | None = None) -> str:
        """Push an artifact whose subject is `subject` (a manifest descriptor: mediaType,
        digest, size) and return its manifest digest; keeps the fallback tag's index up to
        date when the registry has no referrers API."""
        ref = Reference.of(ref)
        ep = self._ep(ref)
        for data in [EMPTY, *(b for _, b, _ in blobs)]:
            self._upload(ep, ref, data)
        body = artifact_manifest(subject, artifact_type, blobs, annotations)
        digest = digest_of(body)
        r = self._put(ep, ref, digest, body, OCI_MANIFEST)
        if r.headers.get("OCI-Subject"):  # the registry indexes referrers itself
            return digest
        desc = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body),
                "artifactType": artifact_type, **({"annotations": annotations} if annotations else {})}
        tag = fallback_tag(subject["digest"])
        old = self._get(ep, ref, tag, OCI_INDEX)
        index = self._index(old, f"{ref.repository}:{tag}", ep) if old is not None else \
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        if not any(m.get("digest") == digest for m in index["manifests"]):
            index["manifests"].append(desc)
            self._put(ep, ref, tag, canonical_json(index), OCI_INDEX)
        return digest

    @staticmethod
    def _index(body: bytes, what: str, ep) -> dict:
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
                raise ValueError("not an index")
        except ValueError:
            raise VerificationError(f"{what} from {ep.host} is not an OCI index: the referrers "
                                    "tag holds something else; delete that tag") from None
        doc.setdefault("manifests", [])
        return doc

    def list(self, ref: Reference | str, digest: str,
             artifact_type: str | None = None) -> list[dict]:
        """The descriptors of the artifacts whose subject is `digest`, of `artifact_type`
        when given (filtered here too: a registry may ignore the filter)."""
        ref = Reference.of(ref)
        ep = self._ep(ref)
        query = f"?artifactType={artifact_type}" if artifact_type else ""
        r = self.t.request(ep, "GET", f"/v2/{ref.repository}/referrers/{digest}{query}",
                           scope=token_scope(ref, push=False), ok=(200, 404),
                           what=f"referrers of {ref.repository}@{digest}",
                           headers={"Accept": OCI_INDEX})
        body = r.body if r.status == 200 and "json" in r.headers.get("Content-Type", "") else \
            self._get(ep, ref, fallback_tag(digest), OCI_INDEX)
        if body is None:
            return []
        found = self._index(body, f"referrers of {ref.repository}@{digest}", ep)["manifests"]
        return [d for d in found if isinstance(d, dict) and isinstance(d.get("digest"), str)
                and (artifact_type is None or d.get("artifactType") == artifact_type)]

    def blobs(self, ref: Reference | str, desc: dict) -> list[bytes]:
        """The blobs of the artifact `desc` names, each checked against its digest."""
        ref = Reference.of(ref)
        ep = self._ep(ref)
        body = self._get(ep, ref, desc["digest"], OCI_MANIFEST, expect=desc["digest"])
        if body is None:
            raise RegistryError(f"registry {ep.host} lists referrer {desc['digest']} of "
                                f"{ref.repository} but does not have it")
        try:
            layers = json.loads(body).get("layers") or []
            wanted = [(d["digest"], int(d["size"])) for d in layers]
        except (ValueError, AttributeError, KeyError, TypeError):
            raise VerificationError(f"referrer {desc['digest']} of {ref.repository} is not an "
                                    "image manifest with layers") from None
        out = []
        for digest, size in wanted:
            if size > MAX_BLOB:
                raise VerificationError(f"referrer {desc['digest']} of {ref.repository}: its "
                                        f"blob {digest} is {size} bytes, over {MAX_BLOB}")
            data = self._get(ep, ref, digest, "", expect=digest, limit=MAX_BLOB)
            if data is None:
                raise RegistryError(f"registry {ep.host} lacks blob {digest} of referrer "
                                    f"{desc['digest']} in {ref.repository}")
            out.append(data)
        return out
