"""Fuzz harnesses, briefly (a few seconds each): every parser of user or remote input
gives a user-facing error or succeeds, never another exception, a hang or a write
outside its output directory (fuzzlib.py). `bench/fuzz` runs the same harnesses long.

Every crash the fuzzers found is a file in regressions/<harness>/: the input that
crashed, and beside it `<name>.expect`, a piece of the message the user now gets."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_targets import HARNESSES
from fuzzlib import CANARY, Harness, run_case

REGRESSIONS = Path(__file__).parent / "regressions"


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_harness(name, tmp_path):
    h = HARNESSES[name]

    # derandomize: CI repeats the same cases; bench/fuzz is where new ones are looked for.
    @settings(max_examples=h.examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(h.strategy)
    def case(data: bytes):
        outcome = run_case(h, data, tmp_path / "case")
        assert outcome.good, f"{outcome.kind}: {outcome.detail}\ninput: {data!r}"

    case()


def _regressions():
    return sorted(p for p in REGRESSIONS.glob("*/*") if p.suffix != ".expect")


@pytest.mark.parametrize("path", _regressions(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_regression(path, tmp_path):
    outcome = run_case(HARNESSES[path.parent.name], path.read_bytes(), tmp_path / "case")
    assert outcome.good, f"{outcome.kind}: {outcome.detail}"
    expect = path.with_suffix(".expect")
    if expect.exists():
        assert outcome.kind == "error" and expect.read_text().strip() in outcome.detail, outcome.detail


def test_regressions_name_harnesses():
    assert {p.parent.name for p in _regressions()} <= set(HARNESSES)


# ---- the property's checks can fail -------------------------------------------------------

def _writer(action):
    return Harness("probe", lambda data, tmp: action(tmp), (ValueError,), None, writes=True)


@pytest.mark.parametrize("action, kind, says", [
    (lambda tmp: None, "ok", ""),
    (lambda tmp: (tmp / "x").write_text(""), "escape", "wrote outside"),
    (lambda tmp: (tmp / "sentinel").unlink(), "escape", "deleted"),
    (lambda tmp: (tmp / "out").rmdir(), "escape", "output directory itself"),
    (lambda tmp: ((tmp / "out" / "d").mkdir(), (tmp / "out" / "d" / "l").symlink_to("../../in")),
     "escape", "resolves outside"),
    (lambda tmp: ((tmp / "out" / "d").mkdir(), (tmp / "out" / "a").symlink_to("d"),
                  (tmp / "out" / "b").symlink_to("a/../..")), "escape", "resolves outside"),
    (lambda tmp: (tmp / "out" / "l").symlink_to("/etc"), "ok", ""),  # image-root-relative
    (lambda tmp: (tmp / "out" / "l").symlink_to(CANARY / "x") or (CANARY / "x").write_text(""),
     "escape", "through an absolute symlink"),
    (lambda tmp: __import__("time").sleep(3), "hang", "no answer"),
    (lambda tmp: {}["x"], "crash", "KeyError"),
    (lambda tmp: int("x"), "error", "invalid literal"),
])
def test_the_property_catches_what_it_must(tmp_path, action, kind, says):
    outcome = run_case(_writer(action), b"", tmp_path / "case", limit=0.5)
    assert outcome.kind == kind and says in outcome.detail, outcome
