"""Shared caches: the Bazel HTTP cache protocol and REAPI v2 over gRPC.

    settings.py   [remote] in forge.toml and the --remote-* flags (no network, no protobuf)
    results.py    forge's keys and outputs as REAPI Action / ActionResult / Tree messages
    transfer.py   errors, retries, the verifying download sink
    http.py       GET/HEAD/PUT <base>/ac/<sha256> and <base>/cas/<sha256>
    reapi.py      Capabilities, CAS, ByteStream and ActionCache over gRPC
    cache_client.py  what the executor calls: lookup() and upload(), never failing a build
    worker.py     `forge worker`: a Remote Workers API bot (BuildGrid's Bots) running leases
    staging.py    the worker's blob cache, input-root staging and output collection
    proto/        generated REAPI, ByteStream and Remote Workers messages (dev/reapi-protos.py)

Importing this package costs nothing: protobuf and grpc load only when a remote cache
is configured and a build misses its local cache.
"""
