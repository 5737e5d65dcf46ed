"""CycloneDX 1.6 JSON (https://cyclonedx.org/docs/1.6/json/), the second SBOM format,
derived from the SPDX document so the two always say the same thing.

Each SPDX package or file becomes a component whose `bom-ref` is its SPDX id; the
described element is `metadata.component`; `A CONTAINS B` becomes B in A's `dependsOn`
(CycloneDX nests contained components, but a package two images hold would then appear
twice with one bom-ref, which the format forbids). The serial number is a UUID made from
the content's digest, so the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import uuid

_TYPES = {"CONTAINER": "container", "OPERATING-SYSTEM": "operating-system",
          "LIBRARY": "library", "APPLICATION": "application"}
_ALGS = {"SHA1": "SHA-1", "SHA256": "SHA-256"}


def _hashes(checksums: list[dict]) -> list[dict]:
    return [{"alg": _ALGS[c["algorithm"]], "content": c["checksumValue"]}
            for c in checksums if c["algorithm"] in _ALGS]


def _component(p: dict) -> dict:
    c = {"type": _TYPES.get(p.get("primaryPackagePurpose", ""), "library"), "bom-ref": p["SPDXID"],
         "name": p["name"]}
    if p.get("versionInfo"):
        c["version"] = p["versionInfo"]
    if p.get("supplier", "").startswith(("Person: ", "Organization: ")):
        c["supplier"] = {"name": p["supplier"].split(": ", 1)[1]}
    purl = next((r["referenceLocator"] for r in p.get("externalRefs", [])
                 if r.get("referenceType") == "purl"), None)
    if purl:
        c["purl"] = purl
    if p.get("checksums"):
        c["hashes"] = _hashes(p["checksums"])
    lic = p.get("licenseDeclared", "NOASSERTION")
    if lic not in ("NOASSERTION", "NONE"):
        c["licenses"] = [{"expression": lic}]
    return c


def _file(f: dict) -> dict:
    return {"type": "file", "bom-ref": f["SPDXID"], "name": f["fileName"].removeprefix("./"),
            "hashes": _hashes(f.get("checksums", []))}


def from_spdx(doc: dict, tool_version: str) -> dict:
    described = (doc.get("documentDescribes") or [None])[0]
    comps = {p["SPDXID"]: _component(p) for p in doc.get("packages", [])}
    comps.update({f["SPDXID"]: _file(f) for f in doc.get("files", [])})
    deps: dict[str, list[str]] = {}
    for r in doc.get("relationships", []):
        if r["relationshipType"] == "CONTAINS" and r["spdxElementId"] in comps \
                and r["relatedSpdxElement"] in comps:
            deps.setdefault(r["spdxElementId"], []).append(r["relatedSpdxElement"])
    body = {
        "bomFormat": "CycloneDX", "specVersion": "1.6", "version": 1,
        "metadata": {"timestamp": doc["creationInfo"]["created"],
                     "tools": {"components": [{"type": "application", "name": "forge",
                                               "version": tool_version}]}},
        "components": [comps[k] for k in sorted(comps) if k != described],
        "dependencies": [{"ref": k, "dependsOn": sorted(set(v))} for k, v in sorted(deps.items())],
    }
    if described in comps:
        body["metadata"]["component"] = comps[described]
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    return {**body, "serialNumber": f"urn:uuid:{uuid.UUID(bytes=digest[:16], version=4)}"}
