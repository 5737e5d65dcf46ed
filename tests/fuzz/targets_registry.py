"""A harness for what a registry serves when forge pulls: the top manifest or index, the
platform manifest, the config and a layer, from a real HTTP server on the loopback (one
per process, in a thread) that answers with the input's documents. The property: the
pull succeeds or raises a RegistryError or ImageError."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hypothesis import strategies as st

from fuzz_strategies import json_bytes, mutated, seeded
from fuzzlib import Harness
from targets_images import _CONFIG, _INDEX, _MANIFEST

from forge.formats.image.errors import ImageError
from forge.formats.registry.errors import RegistryError

_SERVED: dict[str, tuple[int, dict, bytes]] = {}  # path -> (status, headers, body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - http.server's name
        status, headers, body = _SERVED.get(self.path, (404, {}, b'{"errors": [{"code": "NOT_FOUND"}]}'))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@functools.cache
def _server() -> int:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv.server_address[1]


@functools.cache
def _layer() -> tuple[bytes, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        ti = tarfile.TarInfo("etc/hostname")
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"fz\n"))
    return gzip.compress(raw.getvalue(), mtime=0), _sha(raw.getvalue())


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def run_pull(data: bytes, tmp: Path) -> None:
    """"@C", "@L", "@D" and "@M" stand for the digests of the config, the layer, the
    layer's diff_id and the platform manifest, "@S", "@CS" and "@LS" for the sizes of the
    manifest, the config and the layer; a first byte
    "I" serves the top document as an index."""
    port = _server()
    layer, diff_id = _layer()
    top, _, rest = data.partition(b"\0")
    manifest, _, config = rest.partition(b"\0")
    config = config.replace(b'"@D"', json.dumps(diff_id).encode())
    manifest = manifest.replace(b'"@C"', json.dumps(_sha(config)).encode()) \
        .replace(b'"@L"', json.dumps(_sha(layer)).encode()) \
        .replace(b'"@CS"', str(len(config)).encode()).replace(b'"@LS"', str(len(layer)).encode())
    index = top[:1] == b"I"
    top = top[1:].replace(b'"@M"', json.dumps(_sha(manifest)).encode()) \
        .replace(b'"@S"', str(len(manifest)).encode()) if index else manifest
    kind = "application/vnd.oci.image.index.v1+json" if index else \
        "application/vnd.oci.image.manifest.v1+json"
    _SERVED.clear()
    _SERVED["/v2/"] = (200, {}, b"{}")
    _SERVED["/v2/a/manifests/1"] = (200, {"Content-Type": kind}, top)
    _SERVED[f"/v2/a/manifests/{_sha(manifest)}"] = (
        200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, manifest)
    for blob in (config, layer):
        _SERVED[f"/v2/a/blobs/{_sha(blob)}"] = (200, {}, blob)
    _puller().pull(f"127.0.0.1:{port}/a:1", tmp / "out")


@functools.cache
def _puller():
    from forge.formats.registry.pull import Puller
    from forge.formats.registry.transport import Transport
    return Puller(Transport(retries=0, timeout=5))  # once: its TLS context costs 0.1 s


_PULL = st.tuples(st.one_of(json_bytes(_INDEX).map(lambda b: b"I" + b), st.just(b"M")),
                  json_bytes(_MANIFEST), json_bytes(_CONFIG)).map(b"\0".join)

HARNESSES = [
    Harness("registry_pull", run_pull, (RegistryError, ImageError),
            seeded([b'I{"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image'
                    b'.manifest.v1+json", "digest": "@M", "size": "@S", "platform": {"os": "linux", '
                    b'"architecture": "amd64"}}]}\0{"schemaVersion": 2, "config": {"mediaType": '
                    b'"application/vnd.oci.image.config.v1+json", "digest": "@C", "size": "@CS"}, '
                    b'"layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", '
                    b'"digest": "@L", "size": "@LS"}]}\0{"rootfs": {"type": "layers", "diff_ids": ["@D"]}}'],
                   st.one_of(_PULL, mutated(_PULL))), examples=60),
]
