"""REAPI v2 over gRPC (BuildGrid, Buildbarn, Buildfarm, NativeLink, bazel-remote).

Capabilities.GetCapabilities is asked once, on first use: the server must accept
sha256, and its max_batch_total_size_bytes bounds the batches. Small blobs travel in
ContentAddressableStorage.BatchReadBlobs / BatchUpdateBlobs, large ones through
ByteStream Read / Write (`{instance}/blobs/{hash}/{size}`,
`{instance}/uploads/{uuid}/blobs/{hash}/{size}`); ActionCache Get/UpdateActionResult
hold the entries. Methods are called by their full names on one shared channel
(grpc channels are thread-safe), so no generated service stubs are needed.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import grpc

from forge.remote.proto import bytestream_pb2 as bs_pb
from forge.remote.proto import remote_execution_pb2 as re_pb
from forge.remote.results import Digest
from forge.remote.settings import RemoteSettings
from forge.remote.transfer import RemoteError, with_retries

CHUNK = 1 << 20  # ByteStream message size: well under gRPC's default 4 MiB limit
DEFAULT_BATCH = 4 << 20  # what a server that states no limit gets (gRPC's message limit)
MAX_MESSAGE = 64 << 20
RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
               grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
               grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
RE = "/build.bazel.remote.execution.v2."
SHA256 = re_pb.DigestFunction.SHA256


class GrpcStore:
    def __init__(self, s: RemoteSettings):
        self.s = s
        target = f"{s.host}:{s.port}"
        options = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE),
                   ("grpc.primary_user_agent", "forge")]
        if s.tls:
            roots = Path(s.ca_cert).read_bytes() if s.ca_cert else None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.metadata = self._metadata = (("authorization", s.authorization),) if s.authorization else ()
        def call(kind: str, path: str, request, response):
            return getattr(self.channel, kind)(path, request_serializer=request.SerializeToString,
                                               response_deserializer=response.FromString)
        self._capabilities = call("unary_unary", RE + "Capabilities/GetCapabilities",
                                  re_pb.GetCapabilitiesRequest, re_pb.ServerCapabilities)
        self._find_missing = call("unary_unary", RE + "ContentAddressableStorage/FindMissingBlobs",
                                  re_pb.FindMissingBlobsRequest, re_pb.FindMissingBlobsResponse)
        self._batch_read = call("unary_unary", RE + "ContentAddressableStorage/BatchReadBlobs",
                                re_pb.BatchReadBlobsRequest, re_pb.BatchReadBlobsResponse)
        self._batch_update = call("unary_unary", RE + "ContentAddressableStorage/BatchUpdateBlobs",
                                  re_pb.BatchUpdateBlobsRequest, re_pb.BatchUpdateBlobsResponse)
        self._get_ac = call("unary_unary", RE + "ActionCache/GetActionResult",
                            re_pb.GetActionResultRequest, re_pb.ActionResult)
        self._update_ac = call("unary_unary", RE + "ActionCache/UpdateActionResult",
                               re_pb.UpdateActionResultRequest, re_pb.ActionResult)
        self._read = call("unary_stream", "/google.bytestream.ByteStream/Read",
                          bs_pb.ReadRequest, bs_pb.ReadResponse)
        self._write = call("stream_unary", "/google.bytestream.ByteStream/Write",
                           bs_pb.WriteRequest, bs_pb.WriteResponse)
        self._checked = False
        self._lock = threading.Lock()
        self.batch_limit = DEFAULT_BATCH
        self.can_update = True

    def describe(self) -> str:
        return self.s.url + (f" (instance {self.s.instance!r})" if self.s.instance else "")

    # --- calls ----------------------------------------------------------------------------

    def _call(self, method, request, what: str, cancel=None, timeout: float | None = None):
        self._check(cancel)
        return self._plain(method, request, what, cancel, timeout)

    def _plain(self, method, request, what, cancel, timeout=None):
        def attempt():
            try:
                return method(request, timeout=timeout or self.s.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                raise rpc_error(e, what, self.s) from None
        return with_retries(attempt, what, cancel)

    def _check(self, cancel) -> None:
        """Ask the server what it supports, once."""
        if self._checked:
            return
        with self._lock:
            if self._checked:
                return
            caps = self._plain(self._capabilities,
                               re_pb.GetCapabilitiesRequest(instance_name=self.s.instance),
                               "GetCapabilities", cancel)
            cc = caps.cache_capabilities
            if cc.digest_functions and SHA256 not in cc.digest_functions:
                raise RemoteError(f"{self.describe()} does not accept sha256 digests", down=True)
            if cc.max_batch_total_size_bytes:
                self.batch_limit = min(cc.max_batch_total_size_bytes, MAX_MESSAGE) - (64 << 10)
            self.can_update = cc.action_cache_update_capabilities.update_enabled or \
                not cc.HasField("action_cache_update_capabilities")
            self._checked = True

    # --- the protocol --------------------------------------------------------------------

    def get_action_result(self, d: Digest, cancel=None, inline=()) -> re_pb.ActionResult | None:
        """The entry, or None; the server may send the files named in `inline` along
        (small ones: it decides), which saves a round trip per output."""
        req = re_pb.GetActionResultRequest(instance_name=self.s.instance, action_digest=d.proto(),
                                           inline_output_files=list(inline), digest_function=SHA256)
        try:
            return self._call(self._get_ac, req, "GetActionResult", cancel)
        except _NotFound:
            return None

    def update_action_result(self, d: Digest, result: re_pb.ActionResult, cancel=None) -> None:
        self._check(cancel)
        if not self.can_update:
            raise RemoteError(f"{self.describe()} does not let clients write its action cache")
        self._call(self._update_ac, re_pb.UpdateActionResultRequest(
            instance_name=self.s.instance, action_digest=d.proto(), action_result=result,
            digest_function=SHA256), "UpdateActionResult", cancel)

    def find_missing(self, digests: list[Digest], cancel=None) -> list[Digest]:
        missing = []
        for i in range(0, len(digests), 2000):
            part = digests[i:i + 2000]
            resp = self._call(self._find_missing, re_pb.FindMissingBlobsRequest(
                instance_name=self.s.instance, blob_digests=[d.proto() for d in part],
                digest_function=SHA256), "FindMissingBlobs", cancel)
            gone = {(m.hash.lower(), m.size_bytes) for m in resp.missing_blob_digests}
            missing += [d for d in part if (d.hash, d.size) in gone]
        return missing

    def read_batch(self, digests: list[Digest], cancel=None) -> dict[str, bytes | None]:
        resp = self._call(self._batch_read, re_pb.BatchReadBlobsRequest(
            instance_name=self.s.instance, digests=[d.proto() for d in digests],
            digest_function=SHA256), "BatchReadBlobs", cancel)
        out: dict[str, bytes | None] = {}
        for r in resp.responses:
            code = r.status.code
            if code == grpc.StatusCode.NOT_FOUND.value[0]:
                out[r.digest.hash.lower()] = None
            elif code != 0:
                raise RemoteError(f"BatchReadBlobs: {r.status.message or 'status ' + str(code)}",
                                  retry=True)
            else:
                out[r.digest.hash.lower()] = r.data
        for d in digests:  # a blob the answer does not mention counts as missing
            out.setdefault(d.hash, None)
        return out

    def write_batch(self, items: list[tuple[Digest, bytes]], cancel=None) -> None:
        resp = self._call(self._batch_update, re_pb.BatchUpdateBlobsRequest(
            instance_name=self.s.instance, digest_function=SHA256,
            requests=[re_pb.BatchUpdateBlobsRequest.Request(digest=d.proto(), data=data)
                      for d, data in items]), "BatchUpdateBlobs", cancel)
        for r in resp.responses:
            if r.status.code != 0:
                raise RemoteError(f"BatchUpdateBlobs refused {r.digest.hash[:16]}...: "
                                  f"{r.status.message}", retry=True)

    def read(self, d: Digest, sink, cancel=None) -> str | None:
        """Stream one blob through ByteStream.Read into `sink`; its xxh3, or None."""
        self._check(cancel)
        name = f"{self.s.instance}/blobs/{d.hash}/{d.size}".lstrip("/")

        def attempt():
            sink.restart()
            try:
                for chunk in self._read(bs_pb.ReadRequest(resource_name=name),
                                        timeout=self._long(d.size), metadata=self._metadata):
                    sink.write(chunk.data)
            except grpc.RpcError as e:
                raise rpc_error(e, "ByteStream.Read", self.s) from None
            return sink.finish()
        try:
            return with_retries(attempt, "ByteStream.Read", cancel)
        except _NotFound:
            return None

    def write(self, d: Digest, source: Path | bytes, cancel=None) -> None:
        self._check(cancel)
        if d.size <= self.batch_limit // 8:
            data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
            return self.write_batch([(d, data)], cancel)
        name = f"{self.s.instance}/uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size}".lstrip("/")

        def requests():
            f = None if isinstance(source, (bytes, bytearray)) else open(source, "rb")
            try:
                offset = 0
                while True:
                    data = source[offset:offset + CHUNK] if f is None else f.read(CHUNK)
                    last = offset + len(data) >= d.size
                    yield bs_pb.WriteRequest(resource_name=name if offset == 0 else "",
                                             write_offset=offset, data=data, finish_write=last)
                    offset += len(data)
                    if last or not data:
                        return
            finally:
                if f is not None:
                    f.close()

        def attempt():
            try:
                resp = self._write(requests(), timeout=self._long(d.size), metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                    return
                raise rpc_error(e, "ByteStream.Write", self.s) from None
            if resp.committed_size not in (d.size, -1):
                raise RemoteError(f"ByteStream.Write committed {resp.committed_size} of "
                                  f"{d.size} bytes", retry=True)
        with_retries(attempt, "ByteStream.Write", cancel)

    def _long(self, size: int) -> float:
        """A deadline that grows with the blob (at 1 MiB/s beyond the first timeout)."""
        return self.s.timeout + size / (1 << 20)

    def close(self) -> None:
        self.channel.close()


class _NotFound(RemoteError):
    pass


def rpc_error(e: grpc.RpcError, what: str, s: RemoteSettings) -> RemoteError:
    code = e.code()
    detail = e.details() or code.name
    if code == grpc.StatusCode.NOT_FOUND:
        return _NotFound(f"{what}: not found")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return RemoteError(f"{s.url} refused {what} ({code.name}: {detail}): check the "
                           "credentials (FORGE_REMOTE_TOKEN, the URL or ~/.netrc)")
    if code == grpc.StatusCode.INVALID_ARGUMENT and "instance" in detail.lower():
        return RemoteError(f"{s.url} has no instance {s.instance!r} ({detail})", down=True)
    down = code == grpc.StatusCode.UNAVAILABLE or code == grpc.StatusCode.DEADLINE_EXCEEDED
    return RemoteError(f"{what} failed ({code.name}: {detail})", retry=code in RETRY_CODES,
                       down=down)
