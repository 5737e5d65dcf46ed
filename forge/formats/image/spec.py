"""The OCI image model (image-spec v1.1, and the Docker v2 types it grew from).

Media types, descriptors, digests and platforms: what every reader and writer of images
(the layout, archives, the registry client) must agree on, declared once here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable

from forge.formats.image.errors import InvalidDigestError, LayoutError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

REF_NAME = "org.opencontainers.image.ref.name"
IMAGE_NAME = "io.containerd.image.name"  # the full reference, as Docker 25+ writes it

# Layer whiteouts (image-spec layer.md) and the PAX headers that carry extended attributes.
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
XATTR_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")

LAYOUT_VERSION = "1.0.0"
MAX_NESTING = 8  # indexes within indexes: deeper is refused, not followed

_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")


# ---- digests -------------------------------------------------------------------------

def split_digest(digest: str) -> tuple[str, str]:
    """(algorithm, hex) of a digest, which often comes from files forge did not write:
    only sha256 and sha512 of the right length pass, so a digest can name a path."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidDigestError(f"invalid digest {digest!r}: expected sha256:<64 hex> "
                                 "(or sha512:<128 hex>)")
    algo, hexd = digest.split(":")
    return algo, hexd


def digest_of(data: bytes, algo: str = "sha256") -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


# ---- descriptors ---------------------------------------------------------------------

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


# ---- the shapes of documents read from layouts and registries ------------------------
# Checked where a document is read, so that the code using it may index it freely and a
# hostile or broken one is a LayoutError naming it, not a KeyError deep inside.

def check_document(doc, kind: str, where: str):
    """`doc` if it has the shape of an OCI `kind` ("index", "manifest", "config");
    else a LayoutError saying what is wrong, in `where`."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise LayoutError(f"{where}: not a valid image {kind}: {what}")

    need(isinstance(doc, dict), f"a JSON object was expected, got {type(doc).__name__}")
    if kind == "index":
        _descriptors(doc.get("manifests", []), "'manifests'", need)
    elif kind == "manifest":
        _descriptors([doc.get("config")], "'config'", need)
        _descriptors(doc.get("layers", []), "'layers'", need)
    else:
        for key in ("os", "architecture", "variant"):
            need(isinstance(doc.get(key, ""), str), f"'{key}' must be a string")
        need(isinstance(doc.get("config") or {}, dict), "'config' must be an object")
        rootfs = doc.get("rootfs", {})
        need(isinstance(rootfs, dict), "'rootfs' must be an object")
        ids = rootfs.get("diff_ids", [])
        need(isinstance(ids, list) and all(isinstance(x, str) for x in ids),
             "'rootfs.diff_ids' must be a list of digests")
    return doc


def _descriptors(items, what: str, need) -> None:
    need(isinstance(items, list), f"{what} must be a list")
    for d in items:
        need(isinstance(d, dict), f"{what} holds {d!r}, not a descriptor object")
        try:
            split_digest(d.get("digest"))
        except InvalidDigestError as e:
            need(False, f"a descriptor of {what} has an {e}")
        size = d.get("size")
        need(isinstance(size, int) and not isinstance(size, bool) and size >= 0,
             f"a descriptor of {what} has the size {size!r}")
        need(isinstance(d.get("mediaType", ""), str),
             f"a descriptor of {what} has a non-string mediaType")
        platform = d.get("platform") or {}
        need(isinstance(platform, dict) and all(isinstance(platform.get(k, ""), str)
                                                for k in ("os", "architecture", "variant")),
             f"a descriptor of {what} has the platform {platform!r}")
        need(isinstance(d.get("annotations") or {}, dict),
             f"a descriptor of {what} has annotations that are not an object")


@dataclass(frozen=True)
class LayerInfo:
    """What an OCI manifest and config need to know about a written layer."""

    digest: str  # sha256 of the bytes as stored (compressed or not)
    size: int
    diff_id: str  # sha256 of the uncompressed tar: what config rootfs.diff_ids lists
    media_type: str

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


# ---- platforms -----------------------------------------------------------------------

def parse_platform(platform: str | Iterable[str]) -> tuple[str, str, str | None]:
    """`linux/arm64/v8` or ("linux", "arm64", "v8") -> (os, architecture, variant)."""
    parts = platform.split("/") if isinstance(platform, str) else list(platform)
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform {platform!r} is not os/architecture[/variant]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def platform_dict(platform) -> dict:
    os_, arch, variant = parse_platform(platform)
    d = {"os": os_, "architecture": arch}
    if variant:
        d["variant"] = variant
    return d


def platform_str(p: dict) -> str:
    return "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)


def platform_matches(p: dict, want: tuple[str, str, str | None]) -> bool:
    """Whether a descriptor's platform is `want`; no variant wanted matches any, and
    arm64 without a variant is v8 (as containerd's matcher says)."""
    os_, arch, variant = want
    have = p.get("variant") or ("v8" if p.get("architecture") == "arm64" else None)
    return p.get("os") == os_ and p.get("architecture") == arch and \
        (variant is None or variant == have)


# ---- architectures ---------------------------------------------------------------------

# Debian's architecture names -> OCI's (GOARCH); for amd64 and arm64 they are the same.
DEBIAN_TO_OCI = {"amd64": "amd64", "arm64": "arm64", "armhf": "arm", "i386": "386",
                 "ppc64el": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_MACHINE_TO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def host_arch() -> str:
    """This machine's architecture by Debian's (and OCI's) name: amd64, arm64."""
    import platform
    m = platform.machine().lower()
    return _MACHINE_TO_ARCH.get(m, m)
