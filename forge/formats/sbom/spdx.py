"""SPDX 2.3 documents as JSON (https://spdx.github.io/spdx-spec/v2.3/), written so the same
inputs give the same bytes.

A document is a `Document` being filled: packages (a Debian package, an OCI image, a
kernel), files (each with SHA1, which SPDX 2.3 requires, and SHA256), relationships
(`A CONTAINS B`) and the `LicenseRef-` licences it uses, which SPDX requires to be
defined in `hasExtractedLicensingInfos`. Identifiers are derived from what an element is
(`SPDXRef-deb-redis-server-5-7.0.15-1-deb12u1-amd64`), never from a counter, so merging
the documents of two images that share a package gives one element. Nothing depends on
the clock: `created` comes from SOURCE_DATE_EPOCH, and the namespace is a digest of the
content.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from urllib.parse import quote

NAMESPACE_BASE = "https://forge.invalid/spdx"
NOASSERTION = "NOASSERTION"


def spdx_id(kind: str, *parts: str) -> str:
    text = "-".join(p for p in parts if p)
    clean = re.sub(r"[^A-Za-z0-9.\-]+", "-", text).strip("-")
    # keep ids of different texts apart even when cleaning made them alike
    if clean != text:
        clean += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"SPDXRef-{kind}-{clean}"


def created(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def deb_purl(rec: dict, distro: str = "debian") -> str:
    q = f"arch={quote(rec['architecture'])}"
    if rec.get("source") and rec["source"] != rec["package"]:
        q += f"&upstream={quote(rec['source'])}"
    return f"pkg:deb/{distro}/{quote(rec['package'])}@{quote(rec['version'], safe='')}?{q}"


def oci_purl(name: str, digest: str, repository_url: str = "", tag: str = "") -> str:
    qs = []
    if repository_url:
        qs.append(f"repository_url={quote(repository_url, safe='')}")
    if tag:
        qs.append(f"tag={quote(tag, safe='')}")
    base = re.sub(r"[^a-z0-9._\-]+", "-", name.rsplit("/", 1)[-1].lower()).strip("-") or "image"
    return f"pkg:oci/{quote(base)}@{quote(digest, safe='')}" + (f"?{'&'.join(qs)}" if qs else "")


class Document:
    def __init__(self, name: str):
        self.name = name
        self.packages: dict[str, dict] = {}
        self.files: dict[str, dict] = {}
        self.relationships: list[tuple[str, str, str]] = []
        self.extracted: dict[str, str] = {}  # LicenseRef -> its name
        self.describes: list[str] = []

    # elements
    def package(self, spdxid: str, name: str, version: str = "", *, purl: str = "",
                sha256: str = "", license: str | None = None, supplier: str = "",
                homepage: str = "", purpose: str = "", download: str = "",
                comment: str = "", source: str = "") -> str:
        p = {"SPDXID": spdxid, "name": name, "downloadLocation": download or NOASSERTION,
             "filesAnalyzed": False, "licenseConcluded": NOASSERTION,
             "licenseDeclared": license or NOASSERTION, "copyrightText": NOASSERTION}
        if version:
            p["versionInfo"] = version
        if sha256:
            p["checksums"] = [{"algorithm": "SHA256", "checksumValue": sha256}]
        if purl:
            p["externalRefs"] = [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                                  "referenceLocator": purl}]
        if supplier:
            p["supplier"] = supplier
        if homepage:
            p["homepage"] = homepage
        if purpose:
            p["primaryPackagePurpose"] = purpose
        if source:
            p["sourceInfo"] = source
        if comment:
            p["comment"] = comment
        self.packages.setdefault(spdxid, p)
        return spdxid

    def deb(self, rec: dict, distro: str = "debian") -> str:
        """A Debian package from its inventory record (forge.formats.debian.inventory)."""
        sid = spdx_id("deb", rec["package"], rec["version"], rec["architecture"])
        for ref, name in (rec.get("license_refs") or {}).items():
            self.extracted.setdefault(ref, name)
        maint = rec.get("maintainer", "")
        supplier = f"Person: {maint}" if maint else "Organization: Debian"
        return self.package(sid, rec["package"], rec["version"], purl=deb_purl(rec, distro),
                            sha256=rec.get("sha256", ""), license=rec.get("license"),
                            supplier=supplier, homepage=rec.get("homepage", ""),
                            purpose="LIBRARY" if rec["package"].startswith("lib") else "APPLICATION",
                            source=f"built from the Debian source package {rec['source']} "
                            f"{rec.get('source_version') or rec['version']}")

    def image(self, name: str, digest: str, *, repository_url: str = "", tag: str = "") -> str:
        sid = spdx_id("oci", name, digest.split(":")[-1][:16])
        return self.package(sid, name, digest, purl=oci_purl(name, digest, repository_url, tag),
                            sha256=digest.split(":", 1)[1] if digest.startswith("sha256:") else "",
                            purpose="CONTAINER")

    def file(self, path: str, data: bytes | None = None, *, sha256: str = "", sha1: str = "",
             comment: str = "") -> str:
        path = "./" + path.lstrip("./").lstrip("/") if not path.startswith("./") else path
        sid = spdx_id("file", path.lstrip("./"))
        if data is not None:
            sha256, sha1 = hashlib.sha256(data).hexdigest(), hashlib.sha1(data).hexdigest()
        checks = [{"algorithm": "SHA1", "checksumValue": sha1 or "0" * 40}]
        if sha256:
            checks.append({"algorithm": "SHA256", "checksumValue": sha256})
        f = {"SPDXID": sid, "fileName": path, "checksums": checks,
             "licenseConcluded": NOASSERTION, "copyrightText": NOASSERTION}
        if comment:
            f["comment"] = comment
        self.files.setdefault(sid, f)
        return sid

    def relate(self, a: str, kind: str, b: str) -> None:
        if (a, kind, b) not in self.relationships:
            self.relationships.append((a, kind, b))

    def merge(self, other: dict, into: str) -> None:
        """Take in another SPDX 2.x JSON document (an image's, an attestation's): its
        elements and relationships, what it describes becoming contained by `into`."""
        for p in other.get("packages", []):
            self.packages.setdefault(p["SPDXID"], p)
        for f in other.get("files", []):
            self.files.setdefault(f["SPDXID"], f)
        for lic in other.get("hasExtractedLicensingInfos", []):
            self.extracted.setdefault(lic["licenseId"], lic.get("name", lic["licenseId"]))
        described = list(other.get("documentDescribes", []))
        for r in other.get("relationships", []):
            a, kind, b = r["spdxElementId"], r["relationshipType"], r["relatedSpdxElement"]
            if a == "SPDXRef-DOCUMENT" and kind == "DESCRIBES":
                described.append(b)
            elif a != "SPDXRef-DOCUMENT" and b != "SPDXRef-DOCUMENT":
                self.relate(a, kind, b)
        for b in dict.fromkeys(described):
            if b in self.packages or b in self.files:
                self.relate(into, "CONTAINS", b)

    def _analysed(self) -> list[dict]:
        """The packages, those that contain files marked as analysed, with the verification
        code SPDX then requires: the SHA1 of their files' sorted SHA1s."""
        owned: dict[str, list[str]] = {}
        for a, kind, b in self.relationships:
            if kind == "CONTAINS" and a in self.packages and b in self.files:
                owned.setdefault(a, []).append(self.files[b]["checksums"][0]["checksumValue"])
        out = []
        for k in sorted(self.packages):
            p = self.packages[k]
            if k in owned:
                code = hashlib.sha1("".join(sorted(owned[k])).encode()).hexdigest()
                p = {**p, "filesAnalyzed": True, "packageVerificationCode":
                     {"packageVerificationCodeValue": code}}
            out.append(p)
        return out

    # the document
    def to_dict(self, created_at: str, creators: list[str]) -> dict:
        body = {
            "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
            "name": self.name,
            "creationInfo": {"created": created_at, "creators": sorted(creators)},
            "documentDescribes": list(dict.fromkeys(self.describes)),
            "packages": self._analysed(),
            "files": [self.files[k] for k in sorted(self.files)],
            "hasExtractedLicensingInfos": [
                {"licenseId": ref, "name": name,
                 "extractedText": f"The licence Debian's machine-readable copyright files call "
                                  f"\"{name}\": see the package's /usr/share/doc/*/copyright."}
                for ref, name in sorted(self.extracted.items())],
            "relationships": [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                               "relatedSpdxElement": d} for d in dict.fromkeys(self.describes)]
            + [{"spdxElementId": a, "relationshipType": k, "relatedSpdxElement": b}
               for a, k, b in sorted(self.relationships)],
        }
        if not body["files"]:
            del body["files"]
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        slug = re.sub(r"[^A-Za-z0-9.\-]+", "-", self.name).strip("-")
        return {**body, "documentNamespace": f"{NAMESPACE_BASE}/{slug}-{digest}"}


def dumps(doc: dict) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
