"""SLSA provenance v1 (https://slsa.dev/spec/v1.0/provenance) in an in-toto Statement v1
(https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md), as a plain dict
so it can be printed, written or signed (a DSSE envelope wraps its JSON bytes).

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name", "digest": {"sha256"}}],          what was built
     "predicateType": "https://slsa.dev/provenance/v1",
     "predicate": {"buildDefinition": {"buildType", "externalParameters",
                                       "internalParameters", "resolvedDependencies"},
                   "runDetails": {"builder": {"id", "version"},
                                  "metadata": {"invocationId", "startedOn", "finishedOn"}}}}

Everything but `runDetails.metadata` is a function of what was built and from what, so two
builds of one commit give the same statement apart from it: lists are sorted, and
duplicates (one package fetched by two targets) are merged.
"""

from __future__ import annotations

import time

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://forge.invalid/buildtypes/forge-build/v1"
DEFAULT_BUILDER = "https://forge.invalid/builders/local"


def timestamp(t: float) -> str:
    """RFC 3339 in UTC, whole seconds, as SLSA's examples write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def descriptor(*, name: str = "", uri: str = "", digest: dict | None = None,
               annotations: dict | None = None) -> dict:
    """An in-toto ResourceDescriptor: at least one of name, uri, digest."""
    d: dict = {}
    if uri:
        d["uri"] = uri
    if name:
        d["name"] = name
    if digest:
        d["digest"] = dict(sorted(digest.items()))
    if annotations:
        d["annotations"] = dict(sorted(annotations.items()))
    return d


def _merged(descs: list[dict]) -> list[dict]:
    out: dict[tuple, dict] = {}
    for d in descs:
        key = (d.get("uri", ""), d.get("name", ""), tuple(sorted((d.get("digest") or {}).items())))
        out.setdefault(key, d)
    return [out[k] for k in sorted(out)]


def statement(*, subjects: list[dict], external: dict, internal: dict,
              dependencies: list[dict], builder_id: str, builder_version: dict,
              invocation_id: str, started: float, finished: float,
              build_type: str = BUILD_TYPE, byproducts: list[dict] | None = None) -> dict:
    run: dict = {"builder": {"id": builder_id, "version": dict(sorted(builder_version.items()))},
                 "metadata": {"invocationId": invocation_id, "startedOn": timestamp(started),
                              "finishedOn": timestamp(finished)}}
    if byproducts:
        run["byproducts"] = _merged(byproducts)
    return {
        "_type": STATEMENT_TYPE,
        "subject": sorted(subjects, key=lambda s: s["name"]),
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {"buildType": build_type, "externalParameters": external,
                                "internalParameters": internal,
                                "resolvedDependencies": _merged(dependencies)},
            "runDetails": run,
        },
    }
