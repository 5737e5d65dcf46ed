"""A client for the OCI distribution API (Docker Registry HTTP API v2).

Pulling writes an OCI image layout (through `forge.formats.image.layout`, as every other
writer of layouts) holding one platform's image; pushing reads such a layout. What is
verified on the way is in `pull`; endpoints and redirects in `transport` (connections,
proxies, TLS and retries in `forge.formats.http`);
credentials in `auth`; errors in `errors`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Mapping

from forge.formats.image.reference import Reference
from forge.formats.registry.pull import Progress, PullResult, Puller, Resolved
from forge.formats.registry.push import Pusher
from forge.formats.registry.referrers import Referrers
from forge.formats.registry.transport import Transport


class RegistryClient:
    """Pull and push OCI images. Thread-safe."""

    def __init__(self, *, insecure: list[str] | tuple[str, ...] = (),
                 mirrors: dict[str, list[str]] | None = None,
                 docker_config: Path | None = Path("~/.docker/config.json"),
                 timeout: float = 30, retries: int = 3, max_workers: int = 4,
                 backoff: float = 0.25, ca_bundle: str | Path | None = None,
                 env: Mapping[str, str] | None = None):
        """`ca_bundle`: CA certificates trusted besides the system's; `env`: where the proxy
        variables are read (default os.environ)."""
        self.transport = Transport(
            insecure=insecure, mirrors=mirrors, timeout=timeout, retries=retries, backoff=backoff,
            docker_config=Path(docker_config).expanduser() if docker_config else None,
            ca_bundle=ca_bundle, env=env)
        self._puller = Puller(self.transport, max_workers)
        self._pusher = Pusher(self.transport, max_workers)
        self._referrers = Referrers(self.transport)

    @property
    def requests(self) -> Counter[str]:
        """HTTP requests sent, by method."""
        return self.transport.requests

    def resolve(self, ref: Reference | str, platform: str = "linux/amd64") -> Resolved:
        """The digest a reference names now, and the manifest chosen for `platform`."""
        return self._puller.resolve(ref, platform)

    def pull(self, ref: Reference | str, layout_dir: Path | str, *,
             platform: str = "linux/amd64", progress: Progress | None = None) -> PullResult:
        """Fetch and verify one platform's image into an OCI layout at `layout_dir`
        (replaced if it is already an OCI layout or empty)."""
        return self._puller.pull(ref, layout_dir, platform=platform, progress=progress)

    def push(self, layout_dir: Path | str, ref: Reference | str) -> str:
        """Push the image of an OCI layout and return the manifest digest the registry
        reports. The layout's entry named `ref.tag` (`org.opencontainers.image.ref.name`)
        is pushed, else its only entry; several unnamed entries are pushed as one index."""
        return self._pusher.push(layout_dir, ref)

    def attach(self, ref: Reference | str, subject: dict, artifact_type: str,
               blobs: list[tuple[str, bytes, dict]], annotations: dict | None = None) -> str:
        """Attach an artifact (OCI 1.1 referrer) to the manifest `subject` describes; with
        the tag-schema fallback on registries without the referrers API. Returns its digest."""
        return self._referrers.attach(ref, subject, artifact_type, blobs, annotations)

    def referrers(self, ref: Reference | str, digest: str,
                  artifact_type: str | None = None) -> list[tuple[dict, list[bytes]]]:
        """The artifacts attached to `digest`: each descriptor with its verified blobs."""
        return [(d, self._referrers.blobs(ref, d))
                for d in self._referrers.list(ref, digest, artifact_type)]
