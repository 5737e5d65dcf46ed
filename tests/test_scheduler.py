"""The scheduler against a fake ActionExecutor: the seam a second executor (remote
execution) plugs into. No keys, caches or sandboxes: only what is asked, where, when."""

from __future__ import annotations

import threading
import time

from forge.labels import Label
from forge.model import Action, Artifact
from forge.scheduler import ActionResult, Scheduler


def act(name, deps=(), pool=None) -> Action:
    return Action(Label("p", name), "Fake", "test@1",
                  tuple(Artifact(f"forge-out/p/{d}", source=False) for d in deps),
                  (Artifact(f"forge-out/p/{name}", source=False),), function="Fake", pool=pool)


class FakeExecutor:
    """Hits for names in `cached`, shared-cache hits for `remote`, failures for `failing`;
    everything else executes for `sleep` seconds."""

    def __init__(self, cached=(), remote=(), failing=(), lookups=0, sleep=0.02):
        self.epoch = time.perf_counter()
        self.cached, self.remote, self.failing = set(cached), set(remote), set(failing)
        self.slots, self.sleep = lookups, sleep
        self.main = threading.get_ident()
        self.log: list[tuple[str, str]] = []
        self.active = self.most = 0
        self.lock = threading.Lock()
        self.finished = None

    def prepare(self, a, static):
        assert threading.get_ident() == self.main
        self.log.append(("prepare", a.owner.name))
        if a.owner.name in self.cached:
            return ActionResult(a, "cached", "k")
        return ("ticket", a.owner.name)

    def lookups(self):
        return self.slots

    def lookup(self, a, ticket):
        assert ticket == ("ticket", a.owner.name)
        return ActionResult(a, "remote", "k") if a.owner.name in self.remote else None

    def execute(self, a, ticket, worker):
        assert threading.get_ident() != self.main and ticket == ("ticket", a.owner.name)
        with self.lock:
            self.log.append(("execute", a.owner.name))
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(self.sleep)
        with self.lock:
            self.active -= 1
        status = "failed" if a.owner.name in self.failing else "executed"
        return ActionResult(a, status, "k", worker=worker)

    def record(self, r):
        assert threading.get_ident() == self.main and r.status in ("executed", "cached", "remote")
        self.log.append(("record", r.action.owner.name))

    def interrupt(self):
        pass

    def finish(self, interrupted):
        self.finished = interrupted
        return {"fake": True}

    def executed(self):
        return sorted(name for what, name in self.log if what == "execute")


def test_hits_never_reach_a_worker_and_producers_come_first():
    ex = FakeExecutor(cached={"a"})
    actions = [act("a"), act("b", deps=["a"]), act("c", deps=["b"])]
    s = Scheduler(ex, jobs=2).run(actions)
    assert s.ok and [r.status for r in s.results] == ["cached", "executed", "executed"]
    assert ex.executed() == ["b", "c"]
    order = [f"{w}:{n}" for w, n in ex.log]
    assert order.index("record:a") < order.index("prepare:b")
    assert order.index("record:b") < order.index("prepare:c")
    assert ex.finished is False and s.remote == {"fake": True}


def test_shared_cache_hits_are_not_executed_and_take_no_job_slot():
    ex = FakeExecutor(remote={"r1", "r2"}, lookups=4)
    s = Scheduler(ex, jobs=1).run([act("r1"), act("r2"), act("x")])
    assert s.ok and ex.executed() == ["x"]
    assert {r.action.owner.name: r.worker for r in s.results if r.status == "remote"} == \
        {"r1": 2, "r2": 2}  # the row after the job slots


def test_jobs_and_pools_bound_concurrency():
    ex = FakeExecutor(sleep=0.1)
    assert Scheduler(ex, jobs=3).run([act(f"w{i}") for i in range(6)]).ok
    assert ex.most == 3
    ex = FakeExecutor(sleep=0.1)
    assert Scheduler(ex, jobs=3, pools={"vm": 1}).run([act(f"v{i}", pool="vm") for i in range(3)]).ok
    assert ex.most == 1


def test_a_failure_skips_its_dependents_and_stops_unless_keep_going():
    actions = [act("bad"), act("after", deps=["bad"]), act("other", deps=["slow"]), act("slow")]
    s = Scheduler(FakeExecutor(failing={"bad"}), jobs=1).run(actions)
    assert not s.ok and s.count("failed") == 1 and s.count("skipped") >= 1
    ex = FakeExecutor(failing={"bad"})
    s = Scheduler(ex, jobs=1, keep_going=True).run(actions)
    assert {r.action.owner.name: r.status for r in s.results} == \
        {"bad": "failed", "after": "skipped", "other": "executed", "slow": "executed"}


def test_an_executor_that_raises_on_a_worker_stops_the_build_instead_of_hanging():
    """A full disk while recording a result was lost on its worker thread, and the build
    waited for ever (found by bench/faults): the main thread raises it now."""
    import pytest

    class Raising(FakeExecutor):
        def execute(self, a, ticket, worker):
            raise OSError(28, "No space left on device")

    done = []
    t = threading.Thread(target=lambda: done.append(_raised(Raising())), daemon=True)
    t.start()
    t.join(10)
    assert done and isinstance(done[0], OSError), "the build hung or did not raise"
    with pytest.raises(OSError):
        Scheduler(Raising(), jobs=2).run([act("a"), act("b")])


def _raised(ex):
    try:
        Scheduler(ex, jobs=1).run([act("a")])
    except BaseException as e:
        return e
    return None
