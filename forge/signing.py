"""Signing a build's outputs: for each output F of the targets named on the command line,
F.dsse.json beside it, a DSSE envelope over an in-toto Statement whose subjects name F by
sha256 (forge.formats.sign holds the formats; this module finds the key and the outputs).

What a subject is: a file's sha256; for an OCI image layout, the digest of every manifest
its index.json lists and of the document a push sends (forge.formats.registry.push), so
the envelope also names the image in a registry; for another directory, each regular file
under it by its path.

The Statement signed by default carries forge's own minimal predicate (OUTPUT_PREDICATE:
the target, the output's path, forge's version). `sign_statement` takes any Statement, so
that SLSA provenance or an SBOM statement is signed the same way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from forge import __version__
from forge.errors import ForgeError
from forge.formats.common.files import atomic_write, canonical_json
from forge.formats.sign import attest, dsse
from forge.formats.sign.errors import SignError
from forge.formats.sign.keys import PrivateKey, load_private
from forge.workspace import OUT_DIR

ENVELOPE_SUFFIX = ".dsse.json"
OUTPUT_PREDICATE = "https://forge.invalid/signed-output/v1"
BUILDER_ID = "https://forge.invalid/forge"
SPDX_SUFFIX = ".spdx.json"
PASSWORD_ENV = "FORGE_SIGN_PASSWORD"
SPDX_PREDICATE = "https://spdx.dev/Document"


class SigningError(ForgeError):
    """The configured key cannot be used (exit 2: a configuration problem)."""


def sign_statement(statement: dict, key: PrivateKey) -> dict:
    """A DSSE envelope (dict) over `statement`, an in-toto Statement as a plain dict."""
    return dsse.sign(canonical_json(statement), attest.PAYLOAD_TYPE, key)


def key_path(root: Path, config: dict, override: str | None = None) -> Path | None:
    """Where the signing key is: `--sign-key` (relative to the current directory), else
    `[sign] key` in forge.toml (a path relative to the workspace root, or a source-file
    label //pkg:file); None when signing is off (neither, or an empty value)."""
    if override is not None:
        return Path(override).expanduser().absolute() if override else None
    value = (config.get("sign") or {}).get("key")
    if not value:
        return None
    if not isinstance(value, str):
        raise SigningError(f"[sign] key in forge.toml must be a path or a label; got {value!r}",
                           hint='e.g. key = "keys/release" (made by `forge keygen keys/release`)')
    if value.startswith("//"):
        pkg, _, name = value[2:].partition(":")
        return root / pkg / (name or pkg.rsplit("/", 1)[-1])
    return Path(value).expanduser() if Path(value).expanduser().is_absolute() \
        else root / value


def load_key(path: Path, shown: Path | None = None) -> PrivateKey:
    """The key at `path`; an encrypted one is opened with FORGE_SIGN_PASSWORD (an
    environment variable, so the secret never is in forge.toml or a command line)."""
    password = os.environ.get(PASSWORD_ENV)
    try:
        return load_private(path, shown, password.encode() if password else None)
    except SignError as e:
        raise SigningError(str(e), hint="set [sign] key in forge.toml or --sign-key to a "
                           "private key `forge keygen` made") from None


def subjects_of(path: Path, name: str) -> list[dict]:
    """The in-toto subjects that name the output at `path` (see the module's docstring)."""
    if not path.is_dir():
        return [attest.subject(name, attest.file_sha256(path))]
    if (path / "oci-layout").is_file() and (path / "index.json").is_file():
        import json

        from forge.formats.registry.push import images_of, pushed_document
        descs = images_of(json.loads((path / "index.json").read_bytes()).get("manifests") or [])
        digests = [d["digest"] for d in descs]
        body, _ = pushed_document(path, None)
        digests.append("sha256:" + hashlib.sha256(body).hexdigest())
        return [attest.subject(name, d.split(":", 1)[1])
                for d in dict.fromkeys(digests) if d.startswith("sha256:")]
    out = []
    for dirpath, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                out.append(attest.subject(f"{name}/{p.relative_to(path).as_posix()}",
                                          attest.file_sha256(p)))
    return out


def output_statement(label: str, name: str, subjects: list[dict]) -> dict:
    """forge's own minimal Statement for one output: who built what, nothing host-specific
    (no time, no path outside the workspace), so it is the same for the same bytes."""
    return attest.statement(subjects, OUTPUT_PREDICATE, {
        "target": label, "output": name, "builder": {"id": BUILDER_ID, "version": __version__}})


def envelope_path(output: Path) -> Path:
    return output.with_name(output.name + ENVELOPE_SUFFIX)


def write_envelope(output: Path, statement: dict, key: PrivateKey) -> Path:
    """Sign `statement` into output.dsse.json, atomically (a reader or a Ctrl-C never leaves
    half an envelope). An envelope already there that verifies with this key over the same
    Statement is kept: a rebuild of the same bytes changes nothing."""
    dest = envelope_path(output)
    body = canonical_json(statement)
    try:
        old = dsse.decode(dest.read_bytes())
        if dsse.verify(old, key.public) == body:
            return dest
    except (OSError, SignError):
        pass
    atomic_write(dest, dsse.encode(sign_statement(statement, key)))
    return dest


def sign_outputs(root: Path, outputs: list[tuple[str, str]], key: PrivateKey,
                 statement_for=None) -> list[Path]:
    """Sign each (label, output path relative to `root`); returns the envelopes written.
    `statement_for(label, name, subjects)` makes the Statement (default `output_statement`).
    Besides F.dsse.json: F.KIND.dsse.json for each Statement F.KIND.json beside F, and
    forge-out/PKG/NAME.KIND.dsse.json for each Statement the build wrote for the target
    (forge-out/PKG/NAME.KIND.json: SLSA provenance), and F.sbom.dsse.json, an SPDX
    attestation about F, when the same target also outputs an SPDX SBOM (`*.spdx.json`)."""
    make = statement_for or output_statement
    written = []
    sboms: dict[str, list[Path]] = {}
    for label, rel in outputs:
        if rel.endswith(SPDX_SUFFIX) and (root / rel).is_file():
            sboms.setdefault(label, []).append(root / rel)
    for label in dict.fromkeys(label for label, _ in outputs):
        for st_path, st in target_statements(root, label):
            written.append(write_envelope(st_path.with_suffix(""), st, key))
    for label, rel in outputs:
        path = root / rel
        if not path.exists():
            continue
        subjects = subjects_of(path, rel)
        written.append(write_envelope(path, make(label, rel, subjects), key))
        for st_path, st in statements_beside(path):
            written.append(write_envelope(st_path.with_suffix(""), st, key))
        for sbom in sboms.get(label, []):
            if sbom != path:
                doc = _json(sbom)
                if isinstance(doc, dict):
                    written.append(write_envelope(path.with_name(path.name + ".sbom"),
                                                  attest.statement(subjects, SPDX_PREDICATE, doc),
                                                  key))
    return written


def target_statements(root: Path, label: str) -> list[tuple[Path, dict]]:
    """The in-toto Statements a build wrote for the target `label` itself, as
    forge-out/PKG/NAME.KIND.json (SLSA provenance: NAME.provenance.json)."""
    pkg, _, name = label.removeprefix("//").partition(":")
    target = root / OUT_DIR / pkg / (name or pkg.rsplit("/", 1)[-1])
    return statements_beside(target)


def statements_beside(path: Path) -> list[tuple[Path, dict]]:
    """The in-toto Statements in F.KIND.json files beside the output F."""
    out = []
    for p in sorted(path.parent.glob(f"{path.name}.*.json")):
        if p.name.endswith(ENVELOPE_SUFFIX) or p.name.endswith(SPDX_SUFFIX):
            continue
        st = _json(p)
        if isinstance(st, dict) and st.get("_type") == attest.STATEMENT_TYPE:
            out.append((p, st))
    return out


def _json(path: Path):
    import json
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def check_key_config(root: Path, config: dict, override: str | None) -> PrivateKey | None:
    """The signing key, loaded before the build starts so a bad one fails at once."""
    path = key_path(root, config, override)
    if path is None:
        return None
    shown = path.relative_to(root) if path.is_relative_to(root) else path
    if not path.exists():
        raise SigningError(f"the signing key {shown} does not exist",
                           hint=f"make one with `forge keygen {shown}`, or fix [sign] key in "
                           "forge.toml / --sign-key")
    return load_key(path, shown)
