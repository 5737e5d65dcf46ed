"""in-toto Statements v1 (github.com/in-toto/attestation, spec/v1): what is signed.

A Statement is `{"_type": STATEMENT_TYPE, "subject": [{"name", "digest": {"sha256"}}],
"predicateType": URI, "predicate": {...}}`. The subjects name the artifacts by digest, so a
verifier hashes the artifact it holds and looks for that digest among them; the predicate
says what is claimed of them (SLSA provenance, an SBOM, or forge's own minimal claim).
"""

from __future__ import annotations

import json
from pathlib import Path

from forge.formats.common.files import file_sha256  # noqa: F401 (re-exported: signing, verify)
from forge.formats.sign.errors import EnvelopeError, SubjectMismatchError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"


def statement(subjects: list[dict], predicate_type: str, predicate: dict) -> dict:
    return {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": predicate_type,
            "predicate": predicate}


def subject(name: str, sha256: str) -> dict:
    return {"name": name, "digest": {"sha256": sha256}}




def parse(payload: bytes, where: str = "the envelope") -> dict:
    """The Statement an authenticated payload holds, its shape checked."""
    try:
        st = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise EnvelopeError(f"{where}: the signed payload is not JSON") from None
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE:
        raise EnvelopeError(f"{where}: the signed payload is not an in-toto Statement v1 "
                            f"(_type {st.get('_type') if isinstance(st, dict) else None!r})")
    subs = st.get("subject")
    if not isinstance(subs, list) or not subs or not all(
            isinstance(s, dict) and isinstance(s.get("digest"), dict) for s in subs):
        raise EnvelopeError(f"{where}: the Statement has no subject with a digest")
    return st


def match(st: dict, sha256: str, what: str, where: str = "the envelope") -> dict:
    """The subject of `st` whose sha256 is `sha256`; else SubjectMismatchError."""
    for s in st["subject"]:
        if s["digest"].get("sha256") == sha256:
            return s
    signed = ", ".join(f"{s.get('name', '?')} sha256:{str(s['digest'].get('sha256'))[:16]}…"
                       for s in st["subject"][:4])
    raise SubjectMismatchError(
        f"{what} has sha256:{sha256[:16]}…, which {where} does not sign (it signs {signed}): "
        f"{what} was changed after it was signed, or the signature belongs to other bytes")
