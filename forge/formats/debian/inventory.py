"""What a set of installed `.deb` files was: the record an SBOM is written from.

One record per package, read from the `.deb` itself (so it is the package apt verified
and installed, whatever the tree later became):

    {"package", "version", "architecture", "source", "source_version", "sha256", "size",
     "maintainer", "homepage", "license" (SPDX expression or null), "license_refs"
     ({LicenseRef: Debian name}), "files" (sorted paths, no leading "./")}

`source` is the `Source:` field without its version (or the package's own name), as the
purl's `upstream` qualifier and SPDX want it.
"""

from __future__ import annotations

import os
from pathlib import Path

from forge.formats.common.files import file_sha256
from forge.formats.debian import copyright as copyright_format
from forge.formats.debian.package import control_fields, open_data_tar


def copyright_path(package: str) -> str:
    return f"usr/share/doc/{package}/copyright"


def record(deb: str | os.PathLike) -> dict:
    deb = Path(deb)
    fields = control_fields(deb)
    files, text = [], None
    wanted = copyright_path(fields.get("Package", ""))
    with open_data_tar(deb) as tf:
        for m in tf:
            path = m.name[2:] if m.name.startswith("./") else m.name
            path = path.rstrip("/")
            if not path or m.isdir():
                continue
            files.append(path)
            if path == wanted and m.isfile():
                text = tf.extractfile(m).read().decode("utf-8", "replace")
    return {**record_of(deb, fields, text), "files": sorted(files)}


def record_of(deb: Path, fields: dict, copyright_text: str | None) -> dict:
    """The record without its file list, from what a caller that reads the data tar
    anyway (the kernel's step) found there: one decompression instead of two."""
    name = fields.get("Package", "")
    src = fields.get("Source", "").strip()
    source, _, rest = src.partition(" ")
    source_version = rest.strip("() ") or fields.get("Version", "")
    expr, refs = (copyright_format.licenses(copyright_text) if copyright_text is not None
                  else (None, {}))
    return {"package": name, "version": fields.get("Version", ""),
            "architecture": fields.get("Architecture", ""), "source": source or name,
            "source_version": source_version, "sha256": file_sha256(deb), "size": deb.stat().st_size,
            "maintainer": fields.get("Maintainer", ""), "homepage": fields.get("Homepage", ""),
            "license": expr, "license_refs": refs}


def inventory(debs: list[str | os.PathLike]) -> list[dict]:
    """The records of `debs`, sorted by package name (one per name: the last wins)."""
    out = {}
    for d in debs:
        r = record(d)
        out[r["package"]] = r
    return [out[k] for k in sorted(out)]


def pool_path(rec: dict, component: str = "main") -> str:
    """The package's path in a Debian archive (`pool/main/r/redis/redis-server_...deb`),
    by the archive's naming convention: the version without its epoch."""
    src = rec["source"]
    prefix = src[:4] if src.startswith("lib") and len(src) > 3 else src[:1]
    version = rec["version"].split(":", 1)[-1]
    return f"pool/{component}/{prefix}/{src}/{rec['package']}_{version}_{rec['architecture']}.deb"
