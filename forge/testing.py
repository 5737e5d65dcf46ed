"""Running test targets (`forge test`): each test's executable in a fresh scratch
directory holding its runfiles, in parallel, with its timeout."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from forge import leftovers, sandbox
from forge.errors import ForgeError
from forge.plan import Plan
from forge.cache import Cache
from forge.labels import Label


@dataclass
class TestResult:
    label: Label
    passed: bool
    duration: float
    output: str
    reason: str = ""


def run_tests(plan: Plan, root: Path, cache: Cache, jobs: int,
              cancel: threading.Event, config: dict | None = None) -> list[TestResult]:
    def one(label: Label) -> TestResult:
        info = plan.infos[label]
        if "test" in info.extra:
            return _run_in_process(label, info.extra["test"], root, config or {}, cancel)
        exe = info.executable
        scratch = sandbox.new_scratch(cache.tmp, f"test-{label.name}")
        t0 = time.perf_counter()
        try:
            for a in (exe, *info.runfiles):
                sandbox.stage(scratch, a.path, root / a.path)
            env = sandbox.base_env(scratch)
            env.update(info.extra.get("env", {}))
            env.update({"TEST_TARGET": str(label), "TEST_TMPDIR": str(scratch),
                        "TEST_SRCDIR": str(scratch)})
            timeout = info.extra.get("timeout", 300)
            res = sandbox.run([f"./{exe.path}", *info.extra.get("args", [])], scratch, env,
                              timeout=timeout, cancel=cancel,
                              groups=leftovers.ProcessGroups(cache.tmp))
            out = res.output.decode(errors="replace")
            if res.timed_out:
                return TestResult(label, False, time.perf_counter() - t0, out, f"timed out after {timeout} s")
            if res.cancelled:
                return TestResult(label, False, time.perf_counter() - t0, out, "interrupted")
            ok = res.returncode == 0
            return TestResult(label, ok, time.perf_counter() - t0, out,
                              "" if ok else f"exit code {res.returncode}")
        finally:
            sandbox.remove(scratch)
            res_log = scratch.with_name(scratch.name + ".log")
            if res_log.exists():
                res_log.unlink()

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, plan.tests))


def _run_in_process(label: Label, spec: dict, root: Path, config: dict,
                    cancel: threading.Event) -> TestResult:
    """A test whose rule runs it in forge's process (a `@runner`, e.g. booting a VM and
    probing it), rather than as an executable; the runner keeps its own deadline."""
    import io
    from forge.contexts import RunContext
    from forge.ruleset import installed
    out = io.StringIO()
    t0 = time.perf_counter()
    fn = installed().load().runners.get(spec["runner"])
    if fn is None:
        return TestResult(label, False, 0.0, "", f"no runner '{spec['runner']}' is registered")
    reason = ""
    try:
        code = fn(RunContext(spec.get("params"), root, [], config, out=out, cancel=cancel))
    except ForgeError as e:  # the test failed: the first line says why, the rest is detail
        out.write(f"{e.message}\n")
        code, reason = 1, e.message.splitlines()[0]
    except Exception as e:  # noqa: BLE001 - a failing test reports, never crashes the run
        out.write(f"\n{type(e).__name__}: {e}\n")
        code, reason = 1, f"{type(e).__name__}: {e}"
    took = time.perf_counter() - t0
    if cancel.is_set():
        return TestResult(label, False, took, out.getvalue(), "interrupted")
    return TestResult(label, code == 0, took, out.getvalue(), "" if code == 0 else
                      (reason or f"exit code {code}")[:200])


def write_junit(path: str, results: list[TestResult]) -> None:
    from xml.sax.saxutils import escape, quoteattr
    failures = sum(1 for r in results if not r.passed)
    total = sum(r.duration for r in results)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuites tests="{len(results)}" failures="{failures}" time="{total:.3f}">',
             f'  <testsuite name="forge" tests="{len(results)}" failures="{failures}" time="{total:.3f}">']
    for r in results:
        lines.append(f'    <testcase name={quoteattr(str(r.label))} classname="forge" time="{r.duration:.3f}">')
        if not r.passed:
            lines.append(f'      <failure message={quoteattr(r.reason)}>{escape(r.output[-4000:])}</failure>')
        lines.append("    </testcase>")
    lines += ["  </testsuite>", "</testsuites>"]
    Path(path).write_text("\n".join(lines) + "\n")
