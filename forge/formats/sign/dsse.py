"""DSSE envelopes (github.com/secure-systems-lab/dsse, v1.0).

An envelope is JSON: `{"payload": base64(body), "payloadType": type, "signatures":
[{"keyid": hint, "sig": base64(signature)}]}`. What is signed is not the JSON but the
pre-authentication encoding (PAE) of type and body,
`"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body` (LEN: byte count in ASCII decimal), so
a verifier never parses bytes it has not authenticated and a payload cannot be replayed
under another type. Base64 is written standard and read standard or URL-safe, as the spec
asks.
"""

from __future__ import annotations

import base64
import binascii
import json

from forge.formats.common.files import canonical_json
from forge.formats.sign.errors import BadSignatureError, EnvelopeError
from forge.formats.sign.keys import PrivateKey, PublicKey

MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"


def pae(payload_type: str, body: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def sign(body: bytes, payload_type: str, key: PrivateKey) -> dict:
    sig = key.sign(pae(payload_type, body))
    return {"payload": base64.b64encode(body).decode(), "payloadType": payload_type,
            "signatures": [{"keyid": key.keyid, "sig": base64.b64encode(sig).decode()}]}


def encode(envelope: dict) -> bytes:
    """The envelope's bytes as forge writes them (stable: canonical JSON and a newline)."""
    return canonical_json(envelope) + b"\n"


def _b64(text, what: str, where: str) -> bytes:
    if not isinstance(text, str):
        raise EnvelopeError(f"{where}: {what} is not a base64 string")
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(f"{where}: {what} is not valid base64") from None


def decode(data: bytes, where: str = "the envelope") -> dict:
    """Parse and check an envelope's shape (not its signatures)."""
    try:
        env = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise EnvelopeError(f"{where} is not JSON ({e}): is it a DSSE envelope?") from None
    if not isinstance(env, dict) or not isinstance(env.get("payloadType"), str) \
            or "payload" not in env or not isinstance(env.get("signatures"), list):
        raise EnvelopeError(f"{where} is not a DSSE envelope: it needs payload, payloadType "
                            "and signatures")
    if not env["signatures"]:
        raise EnvelopeError(f"{where} carries no signature")
    for s in env["signatures"]:
        if not isinstance(s, dict) or "sig" not in s:
            raise EnvelopeError(f"{where}: a signature without 'sig'")
    _b64(env["payload"], "the payload", where)
    return env


def payload(env: dict, where: str = "the envelope") -> bytes:
    """The payload, NOT authenticated: only to choose among envelopes one signed itself."""
    return _b64(env["payload"], "the payload", where)


def verify(env: dict, key: PublicKey, where: str = "the envelope") -> bytes:
    """The payload of `env` if one of its signatures verifies with `key`; else
    BadSignatureError naming the key ids that signed and the one tried."""
    body = _b64(env["payload"], "the payload", where)
    message = pae(env["payloadType"], body)
    for s in env["signatures"]:
        if key.verify(_b64(s["sig"], "a signature", where), message):
            return body
    signers = ", ".join(str(s.get("keyid") or "(no keyid)")[:16] for s in env["signatures"])
    mine = key.keyid[:16]
    if any(str(s.get("keyid", "")) == key.keyid for s in env["signatures"]):
        why = (f"a signature names key {mine} but does not verify with it: the envelope's "
               "payload or signature was changed after signing")
    else:
        why = (f"it was signed by key {signers}, not by the key given ({mine}): check that "
               "you hold the signer's public key")
    raise BadSignatureError(f"{where}: no valid signature: {why}")
