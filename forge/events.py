"""What a build shows and records: live progress, build-event JSON lines and a
Chrome trace (open it in Perfetto or chrome://tracing)."""

from __future__ import annotations

import json
import sys
import threading
import time

from forge.scheduler import ActionResult, BuildSummary, Reporter


class ProgressReporter(Reporter):
    """tqdm on a terminal; one plain line per action that ran otherwise."""

    def __init__(self, mode: str = "auto", stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "plain"
        self.mode = mode
        self.bar = None
        self.running: dict[str, float] = {}
        self.warnings: list[str] = []
        self._lock = threading.Lock()

    def set_total(self, n: int) -> None:
        if self.mode == "bar" and n:
            from tqdm import tqdm
            self.bar = tqdm(total=n, file=self.stream, unit="action", leave=False,
                            dynamic_ncols=True, bar_format="{desc} [{n}/{total}] {elapsed}")

    def started(self, action) -> None:
        self.running[action.id] = time.perf_counter()
        if self.bar is not None:
            self.bar.set_description_str(action.description[:70], refresh=True)

    def finished(self, r: ActionResult) -> None:
        if r.status == "executed":
            self.running.pop(r.action.id, None)
        if r.status == "failed" and not r.cancelled:
            self._write(f"ERROR: {r.action.description} failed: {r.error}")
        elif self.mode == "plain" and r.status == "executed":
            self._write(f"[{r.duration:6.2f}s] {r.action.description}")
        if self.bar is not None:
            self.bar.update(1)

    def transfer(self, action, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"{action.description[:50]} {done / 2**20:.1f}/"
                                         f"{total / 2**20:.1f} MiB", refresh=True)

    def warning(self, text: str) -> None:
        self._write(f"WARNING: {text}")

    def _write(self, text: str) -> None:
        if self.mode == "none" and not text.startswith(("ERROR", "WARNING")):
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summary_line(summary: BuildSummary) -> str:
    n = len(summary.results)
    parts = [f"{summary.count('executed')} executed", f"{summary.count('cached')} cached"]
    stopped = sum(1 for r in summary.results if r.cancelled)
    for extra in ("remote", "failed", "skipped"):
        k = summary.count(extra) - (stopped if extra == "failed" else 0)
        if k:
            parts.append(f"{k} {extra}")
    if stopped:
        parts.append(f"{stopped} stopped")
    word = "action" if n == 1 else "actions"
    tail = " (interrupted)" if summary.interrupted else ""
    return f"forge: {n} {word}: {', '.join(parts)}{tail}"


def write_build_events(path: str, summary: BuildSummary, exit_code: int,
                       checked: str | None = None) -> None:
    """`checked`: how a served build knew what to check ("watch": from what the watch saw;
    otherwise why everything was checked), absent in-process."""
    with open(path, "w") as f:
        for r in summary.results:
            f.write(json.dumps({
                "type": "action", "label": str(r.action.owner), "mnemonic": r.action.mnemonic,
                "key": r.key, "status": r.status, "duration_s": round(r.duration, 6),
                "outputs": [o.path for o in r.action.outputs],
                **({"ran_on": r.ran_on} if r.ran_on else {}),
                **({"checked": "watch"} if r.watched else {}),
            }) + "\n")
        f.write(json.dumps({"type": "build_finished", "exit_code": exit_code,
                            "executed": summary.count("executed"), "cached": summary.count("cached"),
                            "failed": summary.count("failed"),
                            **({"checked": checked} if checked is not None else {}),
                            **({"remote": summary.count("remote"), "remote_cache": summary.remote}
                               if summary.remote else {})}) + "\n")


def write_profile(path: str, summary: BuildSummary, phases: list[tuple[str, float, float]]) -> None:
    """Chrome trace events: one complete event per action, one row per worker."""
    events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "forge"}}]
    for name, start, dur in phases:
        events.append({"name": name, "cat": "phase", "ph": "X", "pid": 1, "tid": 0,
                       "ts": int(start * 1e6), "dur": max(1, int(dur * 1e6))})
    for r in summary.results:
        if r.status == "skipped":
            continue
        events.append({"name": r.action.description, "cat": r.status, "ph": "X", "pid": 1,
                       "tid": r.worker, "ts": int(r.start * 1e6),
                       "dur": max(1, int(r.duration * 1e6)),
                       "args": {"mnemonic": r.action.mnemonic, "key": r.key, "status": r.status}})
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
