"""Image references (`registry/repository:tag@digest`) with Docker's normalisation.

The grammar is distribution's `reference` package: a name made of lowercase path
components, optionally preceded by a domain (a first component holding a `.` or a `:`, or
`localhost`), then an optional `:tag` and an optional `@algorithm:hex` digest.
Normalisation follows `docker pull`: no domain means `docker.io`, a one-component
repository on docker.io gets `library/`, `index.docker.io` is `docker.io`, and the tag
`latest` is implied only when neither a tag nor a digest is given. `str()` gives the fully
qualified form, which parses back to an equal `Reference`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from forge.formats.image.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_DOMAIN = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")

_SHAPE = ("a reference looks like [registry[:port]/]repository[:tag][@sha256:<64 hex>], "
          "e.g. alpine:3.20, docker.io/library/alpine@sha256:..., localhost:5000/team/app:v1")


@dataclass(frozen=True)
class Reference:
    """A normalised image reference; `tag` and `digest` may both be set."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def of(cls, ref: Reference | str) -> Reference:
        """`ref` itself, or parsed when it is text."""
        return ref if isinstance(ref, Reference) else cls.parse(ref)

    @classmethod
    def parse(cls, text: str) -> Reference:
        original = text
        if not isinstance(text, str) or not text or text != text.strip():
            raise InvalidReferenceError(f"invalid image reference {original!r}: {_SHAPE}")

        def bad(why: str) -> InvalidReferenceError:
            return InvalidReferenceError(f"invalid image reference {original!r}: {why}; {_SHAPE}")

        digest = None
        if "@" in text:
            text, digest = text.split("@", 1)
            if digest.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise bad("a sha256 digest has exactly 64 lowercase hex characters")
            if not _DIGEST.fullmatch(digest):
                raise bad(f"{digest!r} is not a digest (algorithm:hex)")
        tag = None
        slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > slash:
            text, tag = text[:colon], text[colon + 1:]
            if not _TAG.fullmatch(tag):
                raise bad(f"{tag!r} is not a valid tag (letters, digits, _ . -, at most 128, "
                          "not starting with . or -)")
        if not text:
            raise bad("the repository name is empty")
        first, sep, rest = text.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, rest
            if not _DOMAIN.fullmatch(registry):
                raise bad(f"{registry!r} is not a valid registry host[:port]")
        else:
            registry, repository = DOCKER_HUB, text
        if registry == "index.docker.io":
            registry = DOCKER_HUB
        if not _NAME.fullmatch(repository):
            hint = ("repository names must be lowercase" if repository.lower() != repository
                    else "repository components are lowercase letters and digits separated "
                         "by '.', '_', '__' or '-', joined by '/'")
            raise bad(f"{repository!r} is not a valid repository name: {hint}")
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        if len(registry) + 1 + len(repository) > 255:
            raise bad("the name is longer than 255 characters")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, repository, tag, digest)

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after `/manifests/` in the registry API: the digest if any, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)
