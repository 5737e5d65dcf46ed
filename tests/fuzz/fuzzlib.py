"""The fuzzing property, shared by the CI harness tests (tests/fuzz/test_fuzz.py) and the
long runs (bench/fuzz).

A harness feeds one input (bytes, so that hypothesis and atheris drive the same code) to
one parser. The property: the parser succeeds, or raises the user-facing error its
callers turn into a message (the domain's base error of `forge/formats/<domain>/errors.py`,
or `forge.errors.ForgeError` for the engine's own files), with a non-empty message. Never
another exception, never a hang, never a write outside the output directory.

Per-case time limits are SIGALRM-based (`signal.setitimer`), not hypothesis' `deadline`:
the deadline only reports after a slow case has finished, so a real hang would never be
reported, and on this shared 2-core machine a wall-clock deadline of a few hundred
milliseconds fails at random. `Hang` derives from BaseException so that a parser's broad
`except Exception` cannot swallow it.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# An absolute directory that generated symlinks point into (tests/fuzz/fuzz_targets.py):
# an extractor that follows such a link on the host writes here, and the case fails.
CANARY = Path("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp", "forge-fuzz-canary")


class Hang(BaseException):
    """The case ran past its time limit."""


@dataclass
class Harness:
    name: str
    run: Callable[[bytes, Path], None]  # one input; a fresh, empty scratch directory
    allowed: tuple[type[BaseException], ...]  # the user-facing errors of this parser
    strategy: object  # hypothesis strategy of bytes: near-valid, structured inputs
    seeds: Callable[[], list[bytes]] = lambda: []  # real samples of the repo
    examples: int = 150  # hypothesis examples in CI: about 2 s each on this machine
    writes: bool = False  # an extractor: check its scratch directory after each case
    files: bool = True  # uses its scratch directory (False: none is made, which is faster)


@dataclass
class Outcome:
    kind: str  # "ok", "error" (a user error), "crash", "hang", "escape"
    detail: str = ""
    where: str = ""  # for crashes: the innermost frame, to count distinct ones
    error: BaseException | None = field(default=None, repr=False)

    @property
    def good(self) -> bool:
        return self.kind in ("ok", "error")


def _on_alarm(signum, frame):
    raise Hang()


def run_case(h: Harness, data: bytes, scratch: Path, limit: float = 5.0) -> Outcome:
    """Run one input through a harness in `scratch` (emptied first) and judge it."""
    if h.files or h.writes:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    if h.writes:
        if not CANARY.is_dir() or os.listdir(CANARY):
            shutil.rmtree(CANARY, ignore_errors=True)
            CANARY.mkdir(parents=True, exist_ok=True)
        (scratch / "sentinel").write_bytes(b"must survive")  # a deletion outside out/ shows
        (scratch / "out").mkdir()  # where the extractor writes
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        try:
            h.run(data, scratch)
            outcome = Outcome("ok")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Hang:
        outcome = Outcome("hang", f"no answer within {limit} s")
    except h.allowed as e:
        message = str(e).strip()
        outcome = Outcome("error", message, error=e) if message else \
            Outcome("crash", f"{type(e).__name__} with an empty message", _site(e), e)
    except Exception as e:  # noqa: BLE001 - this is what the property forbids
        outcome = Outcome("crash", "".join(traceback.format_exception(e, limit=-8)), _site(e), e)
    finally:
        signal.signal(signal.SIGALRM, old)
    if h.writes:
        escape = _escapes(scratch)
        if escape:  # worse than any exception it may also have caused
            outcome = Outcome("escape", escape)
    return outcome


def _site(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    inner = [f for f in tb if "/forge/" in f.filename] or tb
    last = inner[-1] if inner else None
    return f"{type(e).__name__} at {last.filename.rsplit('/forge/', 1)[-1]}:{last.lineno}" \
        if last else type(e).__name__


# ---- writes outside the output directory -------------------------------------------------

def _escapes(scratch: Path) -> str:
    """What an extractor left where it must not: anything in the scratch directory beside
    out/ and the harness' own inputs (in/), anything in the canary, a device node, or a
    relative symlink in out/ that the host resolves to a place outside out/."""
    if not (scratch / "sentinel").is_file():
        return "deleted outside the output directory (the file beside out/ is gone)"
    stray = sorted(set(os.listdir(scratch)) - {"out", "in", "sentinel"})
    if stray:
        return f"wrote outside the output directory: {stray}"
    if CANARY.exists() and os.listdir(CANARY):
        return f"wrote through an absolute symlink to {CANARY}: {os.listdir(CANARY)}"
    out = scratch / "out"
    if not out.is_dir():
        return "the output directory itself was removed"
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                return f"created a device node {p.relative_to(out)}"
            if stat.S_ISLNK(st.st_mode) and _climbs(out, p.relative_to(out)):
                return f"symlink {p.relative_to(out)} -> {os.readlink(p)} resolves outside out/"
    return ""


def _climbs(root: Path, link: Path) -> bool:
    """Follow `link` on the host, component by component: True when a relative target
    takes it above `root`. An absolute target is image-root-relative by design
    (forge/formats/image/layer_read.py), so following stops there."""
    stack = list(link.parent.parts)
    todo = [c for c in os.readlink(root / link).split("/")]
    if todo and todo[0] == "":
        return False
    for _ in range(200):  # the kernel's ELOOP limit is far lower
        if not todo:
            return False
        c = todo.pop(0)
        if c in ("", "."):
            continue
        if c == "..":
            if not stack:
                return True
            stack.pop()
            continue
        stack.append(c)
        p = root.joinpath(*stack)
        if p.is_symlink():
            target = os.readlink(p)
            if target.startswith("/"):
                return False
            stack.pop()
            todo = target.split("/") + todo
    return False
