"""Resolving and pulling images, everything verified, because a registry or a mirror is not
trusted to send what was asked for:

* manifests are requested with an Accept header naming the OCI and Docker v2 manifest and
  index types (without it a registry may answer with a schema-1 manifest, whose digest
  differs), and `sha256(body)` must equal both the `Docker-Content-Digest` header and the
  digest the reference or the parent index asked for; the bytes are stored exactly as
  served so that the digest stays stable;
* every blob must have the descriptor's size and digest, and each layer's *uncompressed*
  digest (gzip or zstd, decoded on the way in to the end of its last member or frame)
  must equal the config's `rootfs.diff_ids` entry;
* a pull is written into a temporary directory beside the destination and renamed into
  place only when complete, so a failed pull leaves nothing behind;
* the attestation manifests an index carries for the pulled image (BuildKit's layout:
  `vnd.docker.reference.type: attestation-manifest`, `vnd.docker.reference.digest` = the
  image's digest) are kept beside it, every blob checked the same way, so that the SBOMs
  they attest are merged into the SBOMs of what is built from the image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from forge.formats.common.compression import CompressionError, StreamDecompressor
from forge.formats.common.files import replace_dir
from forge.formats.http.errors import HttpError
from forge.formats.image.errors import InvalidDigestError
from forge.formats.image.errors import LayoutError as ImageLayoutError
from forge.formats.image.layout import blob_path, put_blob, write_index
from forge.formats.image.reference import Reference
from forge.formats.image.spec import (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, INDEX_TYPES,
                                      MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, REF_NAME,
                                      Descriptor, check_document, digest_of, parse_platform,
                                      platform_matches, platform_str, split_digest)
from forge.formats.registry.auth import token_scope
from forge.formats.registry.errors import (PlatformNotFoundError, UnsupportedError, VerificationError)
from forge.formats.registry.transport import Endpoint, Transport

ATTESTATION_TYPE, ATTESTED = "vnd.docker.reference.type", "vnd.docker.reference.digest"
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Resolved:
    """What a reference names: `digest` is the top-level object (pin this one), which is an
    index when `index_digest` is set; `manifest_digest` is the chosen platform's manifest."""

    digest: str
    manifest_digest: str
    media_type: str
    index_digest: str | None = None

    def __str__(self) -> str:
        return self.digest


@dataclass(frozen=True)
class PullResult:
    """A pulled image: its layout directory, digests, and the host that served it."""

    reference: Reference
    layout: Path
    digest: str
    manifest_digest: str
    index_digest: str | None
    config_digest: str
    layers: tuple[str, ...]
    source: str
    bytes_fetched: int
    attestations: tuple[str, ...] = ()


class Tracker:
    """Thread-safe accumulation of downloaded bytes for the progress callback."""

    def __init__(self, total: int, callback: Progress | None):
        self.total, self.done, self.callback = total, 0, callback
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.callback:
                self.callback(self.done, self.total)


class Puller:
    """Manifests and blobs from a registry through one `Transport`."""

    def __init__(self, transport: Transport, max_workers: int = 4):
        self.t, self.max_workers = transport, max(1, max_workers)

    def _get_manifest(self, ep: Endpoint, ref: Reference, reference: str, *,
                      expect: str | None = None, size: int | None = None):
        sep = "@" if ":" in reference else ":"
        what = f"manifest {ref.repository}{sep}{reference}"
        r = self.t.request(ep, "GET", f"/v2/{ref.repository}/manifests/{reference}",
                          scope=token_scope(ref, push=False), what=what, headers={"Accept": ACCEPT})
        body = r.body
        announced = r.headers.get("Docker-Content-Digest")
        algo = _split(expect)[0] if expect else "sha256"
        digest = digest_of(body, algo)
        if announced:
            a_algo = _split(announced)[0]
            if digest_of(body, a_algo) != announced:
                raise VerificationError(
                    f"{what} from {ep.host}: the body hashes to {digest_of(body, a_algo)} but the "
                    f"registry announced Docker-Content-Digest {announced}: the transfer was "
                    "corrupted or the registry is broken; retry")
        if expect and digest != expect:
            raise VerificationError(
                f"{what} from {ep.host}: the manifest hashes to {digest}, not the requested "
                f"{expect}: the registry served different content; check the digest in the "
                "reference")
        if size is not None and len(body) != size:
            raise VerificationError(f"{what} from {ep.host}: {len(body)} bytes, but its "
                                    f"descriptor says {size}")
        try:
            doc = json.loads(body)
        except ValueError:
            raise VerificationError(f"{what} from {ep.host} is not JSON") from None
        if not isinstance(doc, dict):
            raise VerificationError(f"{what} from {ep.host} is JSON but not an object")
        if doc.get("schemaVersion") == 1:
            raise UnsupportedError(f"{what} from {ep.host} is a Docker schema-1 manifest, which "
                                   "this client does not support: re-push the image with a "
                                   "current Docker, buildah or skopeo")
        ctype = (r.headers.get("Content-Type") or "").split(";")[0].strip()
        media = doc.get("mediaType") or (ctype if ctype in INDEX_TYPES + MANIFEST_TYPES else "") \
            or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
        if media not in INDEX_TYPES + MANIFEST_TYPES:
            raise UnsupportedError(f"{what} from {ep.host} has media type {media!r}, which is "
                                   "neither an image manifest nor an index")
        if media in INDEX_TYPES:  # a manifest's descriptors are checked when it is pulled
            _check_shape(doc, "index", f"{what} from {ep.host}")
        return body, media, digest_of(body), doc, what

    def _platform_manifest(self, ep: Endpoint, ref: Reference, platform: str):
        """(top-level manifest, platform manifest, platform descriptor or None)."""
        top = self._get_manifest(ep, ref, ref.reference, expect=ref.digest)
        if top[1] not in INDEX_TYPES:
            return top, top, None
        desc = select_platform(top[3].get("manifests") or [], platform, top[4], ep.host)
        man = self._get_manifest(ep, ref, desc["digest"], expect=desc["digest"],
                                 size=desc.get("size"))
        if man[1] in INDEX_TYPES:
            raise UnsupportedError(f"{man[4]}: an index nested in an index is not supported")
        return top, man, desc

    def resolve(self, ref: Reference | str, platform: str = "linux/amd64") -> Resolved:
        """The digest a reference names now, and the manifest chosen for `platform`."""
        ref = Reference.of(ref)

        def one(ep):
            top, man, _ = self._platform_manifest(ep, ref, platform)
            index = top[2] if top[1] in INDEX_TYPES else None
            return Resolved(top[2], man[2], top[1], index)
        return self.t.each_endpoint(ref.registry, True, one)

    def pull(self, ref: Reference | str, layout_dir: Path | str, *,
             platform: str = "linux/amd64", progress: Progress | None = None) -> PullResult:
        """Fetch and verify one platform's image into an OCI layout at `layout_dir`
        (replaced if it is already an OCI layout or empty)."""
        ref = Reference.of(ref)
        dest = Path(layout_dir)
        if dest.exists() and not (dest.is_dir() and (not any(dest.iterdir())
                                                     or (dest / "oci-layout").exists())):
            raise ImageLayoutError(f"cannot pull {ref} into {dest}: it exists and is not an OCI "
                              "layout; choose another directory or remove it")
        return self.t.each_endpoint(ref.registry, True,
                                   lambda ep: self._pull_from(ep, ref, dest, platform, progress))

    def _pull_from(self, ep, ref, dest: Path, platform, progress) -> PullResult:
        top, man, desc = self._platform_manifest(ep, ref, platform)
        body, media, digest, doc, what = man
        config, layers = _blobs_of(doc, what, ep.host)
        attested = self._attestations(ep, ref, top, digest) if desc else []
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
        try:
            put_blob(tmp, digest, body)
            unique = {d["digest"]: d for d in layers}
            extra = {d["digest"]: d for _, a_body, blobs in attested for d in blobs}
            tracker = Tracker(config["size"] + sum(d["size"] for d in unique.values())
                              + sum(d["size"] for d in extra.values()), progress)
            tracker.add(0)
            self._fetch_blob(ep, ref, config, tmp, tracker)
            for a_desc, a_body, _ in attested:
                put_blob(tmp, a_desc["digest"], a_body)
            for d in extra.values():  # in-toto Statements: stored as pushed, digest checked
                self._fetch_blob(ep, ref, d, tmp, tracker)
            config_path = blob_path(tmp, config["digest"])
            try:
                doc = _check_shape(json.loads(config_path.read_bytes()), "config",
                                   f"config {config['digest']} of {what}")
                diff_ids = doc["rootfs"]["diff_ids"]
            except (ValueError, KeyError, TypeError):
                raise VerificationError(f"config {config['digest']} of {what} has no "
                                        "rootfs.diff_ids") from None
            if len(diff_ids) != len(layers):
                raise VerificationError(f"{what}: {len(layers)} layers but the config lists "
                                        f"{len(diff_ids)} diff_ids")
            expected = {}
            for d, diff_id in zip(layers, diff_ids):
                if expected.setdefault(d["digest"], diff_id) != diff_id:
                    raise VerificationError(f"layer {d['digest']} of {what} appears twice with "
                                            "different diff_ids in the config")
            with ThreadPoolExecutor(self.max_workers, thread_name_prefix="pull") as pool:
                futures = [pool.submit(self._fetch_blob, ep, ref, d, tmp, tracker,
                                       expected[d["digest"]]) for d in unique.values()]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception()]
                if failed:
                    for f in futures:
                        f.cancel()
                    raise failed[0].exception()
            name = ref.tag or str(ref)
            entry = {"mediaType": media, "digest": digest, "size": len(body),
                     "annotations": {REF_NAME: name}}
            if desc and desc.get("platform"):
                entry["platform"] = desc["platform"]
            entries = [Descriptor.from_dict(entry)]
            for a_desc, a_body, _ in attested:
                ann = {k: v for k, v in (a_desc.get("annotations") or {}).items()
                       if k in (ATTESTATION_TYPE, ATTESTED)}
                entries.append(Descriptor(a_desc.get("mediaType") or OCI_MANIFEST,
                                          a_desc["digest"], len(a_body),
                                          a_desc.get("platform"), ann))
            write_index(tmp, entries)
            replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        index = top[2] if top[1] in INDEX_TYPES else None
        return PullResult(ref, dest, top[2], digest, index, config["digest"],
                          tuple(d["digest"] for d in layers), ep.host, tracker.done,
                          tuple(a["digest"] for a, _, _ in attested))

    def _attestations(self, ep, ref, top, image_digest: str) -> list:
        """(descriptor, manifest bytes, blob descriptors) of each attestation manifest the
        index `top` lists for `image_digest`; each manifest checked against its digest."""
        out = []
        for d in top[3].get("manifests") or []:
            ann = d.get("annotations") or {}
            if ann.get(ATTESTATION_TYPE) != "attestation-manifest" \
                    or ann.get(ATTESTED) != image_digest:
                continue
            man = self._get_manifest(ep, ref, d["digest"], expect=d["digest"],
                                     size=d.get("size"))
            if man[1] not in MANIFEST_TYPES:
                raise VerificationError(f"{man[4]} from {ep.host}: an attestation of "
                                        f"{image_digest} that is not an image manifest")
            config, layers = _blobs_of(man[3], man[4], ep.host)
            out.append((d, man[0], [config, *layers]))
        return out

    def _fetch_blob(self, ep, ref, desc, layout: Path, tracker: Tracker,
                    diff_id: str | None = None) -> None:
        digest, size = desc["digest"], int(desc["size"])
        algo, hexpart = _split(digest)
        what = f"blob {digest}"
        final = blob_path(layout, digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(hexpart + ".partial")
        r = self.t.request(ep, "GET", f"/v2/{ref.repository}/blobs/{digest}",
                          scope=token_scope(ref, push=False), what=what, stream=True)
        sink = _BlobSink(part, digest, diff_id, tracker, size, f"{what} from {ep.host}")
        try:
            # a cut transfer resumes (Range) or restarts; the digests below judge the result
            self.t.http.download(r.stream.url, sink, headers=r.sent, size=size, label=what,
                                 response=r.stream)
        except HttpError as e:
            sink.close()
            tracker.add(-sink.got)
            raise VerificationError(f"{what} from {ep.host} is truncated: got {sink.got} of "
                                    f"{size} bytes ({e}); retry, or re-push the image if the "
                                    "registry's copy is damaged") from None
        finally:
            r.close()
            sink.close()
        if sink.got < size:
            raise VerificationError(f"{what} from {ep.host} is truncated: got {sink.got} of "
                                    f"{size} bytes; retry, or re-push the image if the "
                                    "registry's copy is damaged")
        got = f"{algo}:{sink.hash.hexdigest()}"
        if got != digest:
            raise VerificationError(f"{what} from {ep.host}: the content hashes to {got}, not "
                                    f"{digest}: the registry's copy is corrupt or the transfer "
                                    "was altered")
        if diff_id:
            for piece in _decompressed(sink.unpack.finish):
                sink.uhash.update(piece)
            if f"sha256:{sink.uhash.hexdigest()}" != diff_id:
                raise VerificationError(f"layer {digest}: its uncompressed content hashes to "
                                        f"sha256:{sink.uhash.hexdigest()}, but the config's "
                                        f"diff_id is {diff_id}: the image is inconsistent; "
                                        "rebuild it")
        os.replace(part, final)


class _BlobSink:
    """A blob arriving into `path`: its digest, and (for a layer) the digest of its
    uncompressed bytes, computed as it comes; `restart` when the server starts over."""

    def __init__(self, path: Path, digest: str, diff_id: str | None, tracker: Tracker, size: int,
                 what: str):
        self.path, self.digest, self.diff_id, self.tracker = path, digest, diff_id, tracker
        self.algo = _split(digest)[0]
        self.size, self.what = size, what
        self.f = path.open("wb")
        self._reset()

    def _reset(self) -> None:
        self.got = 0
        self.hash = hashlib.new(self.algo)
        self.unpack = StreamDecompressor(f"layer {self.digest}") if self.diff_id else None
        self.uhash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.f.write(chunk)
        self.hash.update(chunk)
        self.got += len(chunk)
        self.tracker.add(len(chunk))
        if self.got > self.size:
            raise VerificationError(f"{self.what} is longer than the {self.size} bytes its "
                                    "descriptor says")
        if self.unpack:
            for piece in _decompressed(self.unpack.feed, chunk):
                self.uhash.update(piece)

    def restart(self) -> None:
        self.f.seek(0)
        self.f.truncate()
        self.tracker.add(-self.got)
        self._reset()

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


def _blobs_of(doc: dict, what: str, host: str) -> tuple[dict, list[dict]]:
    """A manifest's config and layer descriptors, each with a valid digest and size."""
    try:
        config, layers = doc["config"], list(doc.get("layers") or [])
        for d in [config, *layers]:
            _split(d["digest"])
            if not isinstance(d["size"], int) or isinstance(d["size"], bool) or d["size"] < 0:
                raise ValueError(d["size"])  # "3" passed int() and broke the sums below
    except (KeyError, TypeError, ValueError):
        raise VerificationError(f"{what} from {host} lacks a valid config or layer "
                                "descriptor") from None
    return config, layers


def _split(digest: str) -> tuple[str, str]:
    try:
        return split_digest(digest)
    except InvalidDigestError:
        raise UnsupportedError(f"digest {digest!r} is not supported: expected sha256:<hex> "
                               "(or sha512:<hex>)") from None


def _decompressed(step, *chunk):
    """A StreamDecompressor step whose failures are the registry's errors."""
    try:
        yield from step(*chunk)
    except CompressionError as e:
        raise VerificationError(f"{e}: the registry's copy is corrupt or the image was "
                                "pushed damaged") from None


def _check_shape(doc, kind: str, where: str):
    """`doc` if it has the shape of an OCI `kind`: a registry's answer is indexed freely below."""
    try:
        return check_document(doc, kind, where)
    except ImageLayoutError as e:
        raise VerificationError(str(e)) from None


def select_platform(manifests: list[dict], platform: str, what: str, host: str) -> dict:
    """The descriptor of an index's manifest for `platform`, one without a variant first."""
    try:
        want = parse_platform(platform)
    except ValueError:
        raise PlatformNotFoundError(f"platform {platform!r} is not os/architecture[/variant], "
                                    "e.g. linux/amd64 or linux/arm/v7") from None
    found = [d for d in manifests if platform_matches(d.get("platform") or {}, want)]
    if not found:
        have = sorted({platform_str(d.get("platform") or {}) for d in manifests} - {""})
        raise PlatformNotFoundError(f"{what} from {host} is an index without a {platform} image;"
                                    f" it has: {', '.join(have) or 'no platforms'}; pass one "
                                    "of those as the platform")
    found.sort(key=lambda d: (d.get("platform") or {}).get("variant") is not None)
    return found[0]
