"""A layer download cut half way resumes with `Range` against the real docker-registry, and
the pulled image is verified as always (digest and diff_id)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import threading
from pathlib import Path

import pytest

from forge.formats.registry.client import RegistryClient
from registry_fixture import registry  # noqa: F401,F811 (fixture)

pytestmark = pytest.mark.real


def _registry_tests():
    spec = importlib.util.spec_from_file_location("registry_tests",
                                                  Path(__file__).with_name("test_registry.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CuttingRelay:
    """An HTTP relay to 127.0.0.1:`upstream` that, the first time a request's path contains
    `cut`, forwards the head and half the body of its answer and closes the connection.
    `requests` holds (request line, headers) as relayed."""

    def __init__(self, upstream: int, cut: str):
        self.upstream, self.cut, self.done = upstream, cut, False
        self.requests: list[tuple[str, dict]] = []
        self.answers: list[str] = []  # the status lines, in the same order
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket):
        f = client.makefile("rb")
        with client:
            while True:
                line = f.readline()
                if not line:
                    return
                headers, raw = {}, line
                while (h := f.readline()) not in (b"\r\n", b""):
                    raw += h
                    k, _, v = h.decode().partition(":")
                    headers[k.strip()] = v.strip()
                body = f.read(int(headers.get("Content-Length", 0)))
                self.requests.append((line.decode().strip(), headers))
                with socket.create_connection(("127.0.0.1", self.upstream)) as up:
                    up.sendall(raw + b"\r\n" + body)
                    uf = up.makefile("rb")
                    head = b""
                    while (h := uf.readline()) not in (b"\r\n", b""):
                        head += h
                    length = next((int(x.split(b":")[1]) for x in head.split(b"\r\n")
                                   if x.lower().startswith(b"content-length:")), 0)
                    answer = b"" if line.startswith(b"HEAD") else uf.read(length)
                    self.answers.append(head.split(b"\r\n")[0].decode())
                if self.cut in line.decode() and not self.done:
                    self.done = True
                    client.sendall(head + b"\r\n" + answer[:len(answer) // 2])
                    return
                client.sendall(head + b"\r\n" + answer)

    def close(self):
        self.sock.close()


def test_a_cut_layer_download_resumes_with_range(registry, tmp_path):
    t = _registry_tests()
    layout = tmp_path / "src"
    desc = t.build_image(layout, [{"big.bin": bytes(range(256)) * 20000}])  # ~5 MB, gzip ~30 kB
    t.write_layout(layout, [desc], "v1")
    direct = RegistryClient(docker_config=None)
    direct.push(layout, f"{registry.host}/app:v1")
    manifest = json.loads((layout / "blobs/sha256" / desc["digest"].split(":")[1]).read_bytes())
    layer = manifest["layers"][0]
    relay = CuttingRelay(int(registry.host.rsplit(":", 1)[1]), layer["digest"])
    try:
        c = RegistryClient(docker_config=None, retries=2, backoff=0.01,
                           insecure=[relay.host])
        pulled = c.pull(f"{relay.host}/app:v1", tmp_path / "pulled")
    finally:
        relay.close()
    blob = tmp_path / "pulled/blobs/sha256" / layer["digest"].split(":")[1]
    assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == layer["digest"]
    assert pulled.layers == (layer["digest"],)
    gets = [(h, a) for (line, h), a in zip(relay.requests, relay.answers) if layer["digest"] in line]
    assert len(gets) == 2 and "Range" not in gets[0][0]
    assert gets[1][0]["Range"] == f"bytes={layer['size'] // 2}-"
    assert gets[1][1].startswith("HTTP/1.1 206")  # the registry sent only the rest
