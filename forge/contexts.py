"""What a rule family's in-process code sees when it runs: `ExecContext` for an action
step (`@action_function`), `RunContext` for a runner (`@runner`, behind `forge run`
and in-process tests). Analysis has its own context (forge.analysis.AnalysisContext)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from forge.errors import ActionFailed


@dataclass
class ExecContext:
    """What an `@action_function` step sees: its parameters and sandbox paths."""

    params: Any
    scratch: "Any"  # pathlib.Path of the sandbox root; inputs and outputs live below it
    inputs: list[str]
    outputs: list[str]
    log: Callable[[str], None] = print
    # Workspace settings that must not change what a step produces (a package mirror,
    # registry mirrors, insecure registries): they are not part of any key.
    config: dict = field(default_factory=dict)
    offline: bool = False
    cancel: Any = None  # threading.Event set on Ctrl-C: long steps should check it
    progress: Callable[[int, int], None] = lambda done, total: None  # bytes, for bars
    groups: Any = None  # forge.leftovers.ProcessGroups: where `run` records its commands

    def path(self, rel: str):
        return self.scratch / rel

    @property
    def source_date_epoch(self) -> int:
        """The fixed time every archive forge writes carries (SOURCE_DATE_EPOCH)."""
        from forge.sandbox import SOURCE_DATE_EPOCH
        return int(SOURCE_DATE_EPOCH)

    def run(self, argv: list[str], *, env: dict | None = None, cwd=None,
            timeout: float | None = None) -> str:
        """Run a host program the way command actions run: clean fixed environment
        (SOURCE_DATE_EPOCH, TZ=UTC...), its own process group, stopped on Ctrl-C.
        Returns its output; a failure raises ActionFailed with the output's tail."""
        import threading
        import uuid

        from forge import sandbox
        full = sandbox.base_env(self.scratch)
        full.update(env or {})
        res = sandbox.run(list(argv), cwd or self.scratch, full, timeout=timeout,
                          cancel=self.cancel or threading.Event(), groups=self.groups,
                          log=self.scratch.with_name(f"{self.scratch.name}.step-{uuid.uuid4().hex[:8]}.log"))
        out = res.output.decode(errors="replace")
        try:
            res.log.unlink()
        except OSError:
            pass
        if res.cancelled:
            raise ActionFailed("interrupted")
        if res.returncode != 0 or res.timed_out:
            why = "timed out" if res.timed_out else f"exit code {res.returncode}"
            tail = "\n".join("  " + ln for ln in out.rstrip().splitlines()[-30:])
            raise ActionFailed(f"{argv[0]} failed ({why}):\n  {' '.join(argv)}\n{tail}")
        return out


@dataclass
class RunContext:
    """What a `@runner` sees when `forge run` runs a built target."""

    params: Any
    root: Any  # pathlib.Path of the workspace; built files are at root / artifact.path
    args: list[str]
    config: dict = field(default_factory=dict)
    # Set when a test runs it (`ctx.info(test={"runner": ..., "params": ...})`): where its
    # output goes (kept for the report and JUnit), and the Ctrl-C event to stop at.
    out: Any = None
    cancel: Any = None
