"""Harnesses for what a registry or a download hands `forge verify`: DSSE envelopes and
the in-toto Statements inside them. Only the signature domain's `SignError` is allowed."""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

from hypothesis import strategies as st

from fuzz_strategies import JSONISH, seeded
from fuzzlib import Harness

from forge.formats.sign.errors import SignError


@functools.cache
def _key():
    from forge.formats.sign.keys import generate
    return generate("ed25519")


def run_envelope(data: bytes, tmp: Path) -> None:
    from forge.formats.sign import attest, dsse
    env = dsse.decode(data)
    st = attest.parse(dsse.payload(env))  # what the pusher reads to choose envelopes
    attest.match(st, "0" * 64, "x")
    dsse.verify(env, _key().public)


def _signed(statement) -> bytes:
    from forge.formats.sign import dsse
    return dsse.encode(dsse.sign(json.dumps(statement).encode(), "application/vnd.in-toto+json",
                                 _key()))


_STATEMENT = st.fixed_dictionaries({
    "_type": st.sampled_from(["https://in-toto.io/Statement/v1", "x"]),
    "subject": st.one_of(JSONISH, st.lists(st.fixed_dictionaries(
        {"name": st.text(max_size=5), "digest": st.one_of(JSONISH, st.fixed_dictionaries(
            {"sha256": st.sampled_from(["0" * 64, "1" * 64, ""])}))}), max_size=3)),
    "predicateType": JSONISH, "predicate": JSONISH})


@st.composite
def _envelope(draw) -> bytes:
    payload = json.dumps(draw(_STATEMENT)).encode()
    env = {"payload": draw(st.one_of(st.just(base64.b64encode(payload).decode()),
                                     st.just(base64.urlsafe_b64encode(payload).decode().rstrip("=")),
                                     JSONISH)),
           "payloadType": draw(st.one_of(st.just("application/vnd.in-toto+json"), JSONISH)),
           "signatures": draw(st.one_of(JSONISH, st.lists(st.fixed_dictionaries(
               {"keyid": JSONISH, "sig": st.one_of(JSONISH, st.just("AAAA"))}), max_size=2)))}
    if draw(st.booleans()):
        env.pop(draw(st.sampled_from(sorted(env))))
    return json.dumps(env).encode()


def _seeds() -> list[bytes]:
    return [_signed({"_type": "https://in-toto.io/Statement/v1",
                     "subject": [{"name": "x", "digest": {"sha256": "0" * 64}}],
                     "predicateType": "https://forge.invalid/signed-output/v1", "predicate": {}})]


HARNESSES = [
    Harness("dsse_envelope", run_envelope, (SignError,), seeded(_seeds(), _envelope()),
            files=False),
]
