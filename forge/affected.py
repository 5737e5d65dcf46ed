"""`forge affected`: the targets whose inputs a git change touches.

A target's inputs are what can change its plan or its outputs: its package's BUILD file
and every `.bzl` file that BUILD file loads, directly or through other `.bzl` files; the
source files it depends on (glob results included) and those its actions read; the files
its rule read, or looked for, while planning (a Dockerfile, an assembly, an absent
`.dockerignore`). `forge.toml` and `forge.lock` count as inputs of every target: a pin
could be traced to the targets that use it, but a lock change is rare and a full build
after it is the safe answer.

A target of the head is affected when
  - one of its inputs at head is a changed path (an edit, an added file a glob now sees),
  - one of its inputs at base is a changed path (a deleted file, a rename's old path),
  - an unchanged file entered or left its inputs (a glob that sees more or fewer files
    because a BUILD file appeared or went in a subdirectory), or
  - something it depends on at head is affected.
The base is loaded and analysed, from a temporary checkout of its tree, only when the
change deletes a file or adds a BUILD file or a `forge.toml`: otherwise the head alone
answers. A base that cannot be loaded makes every target affected, with a warning.
Targets that exist only at base are not reported: there is nothing to build. A target
that still names a source file the change deleted is reported (its input changed), so CI
builds it and the build says which file is missing.

The head is the working tree by default: committed, staged and unstaged changes, and
untracked files that git does not ignore, since `forge build` sees them all. Ignored
files are invisible to git and so to this command.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from forge.errors import ForgeError, Location, UsageError
from forge.labels import Label, Pattern, parse_pattern
from forge.lockfile import LOCK_NAME
from forge.plan import SOURCE_KIND, Node
from forge.workspace import BUILD_NAMES, CONFIG_NAME, OUT_DIR, Workspace, load_config

_STATUS = {"A": "added", "D": "deleted", "M": "changed", "T": "changed type", "U": "unmerged"}


@dataclass
class Result:
    base: str  # the base commit
    head: str | None  # the head commit; None for the working tree
    changes: dict[str, str]  # workspace-relative path -> added, deleted, changed, ...
    targets: dict[Label, tuple[str, str]]  # affected target -> (kind, why), sorted by label
    warnings: list[str] = field(default_factory=list)


def find_affected(ws: Workspace, pattern_texts: list[str], base: str, head: str | None = None,
                  cwd: Path | None = None) -> Result:
    """The targets among `pattern_texts` (as `forge build` expands them: `manual` targets
    only when named; relative patterns from `cwd`, default the current directory) whose
    inputs differ between git revision `base` and `head` (default: the working tree).
    Raises UsageError for a bad revision or a workspace outside git."""
    git = _Git(ws.root)
    base_commit = git.commit(base)
    head_commit = git.commit(head) if head is not None else None
    changes = git.changes(base_commit, head_commit)
    try:
        rel = (cwd or Path.cwd()).absolute().relative_to(ws.root).as_posix()
    except ValueError:
        rel = ""
    patterns = [parse_pattern(p, "" if rel == "." else rel) for p in pattern_texts]
    warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="forge-affected-") as tmp:
        head_ws = ws
        if head_commit is not None:
            head_ws = git.checkout(head_commit, Path(tmp) / "head")
            if head_ws is None:
                raise UsageError(f"there is no workspace at {head}: {git.prefix or '.'}/"
                                 f"{CONFIG_NAME} does not exist in that revision")
        now = _evaluate(head_ws, patterns, include_manual=False, rev=head)
        why: dict[Label, str] = {}
        everything = next((p for p in (CONFIG_NAME, LOCK_NAME) if p in changes), None)
        if everything:
            why = {r: f"{everything} {changes[everything]}" for r in now.roots}
        else:
            for label, paths in now.inputs.items():
                hit = _hit(paths, changes)
                if hit:
                    why[label] = f"{hit} {changes[hit]}"
            if _needs_base(changes):
                then = None
                try:
                    base_ws = git.checkout(base_commit, Path(tmp) / "base")
                    if base_ws is None:
                        raise UsageError(f"it has no {CONFIG_NAME}")
                    then = _evaluate(base_ws, [parse_pattern("//...")], include_manual=True,
                                     rev=base)
                except ForgeError as e:
                    warnings.append(f"the workspace at {base} cannot be loaded ({e.message}); "
                                    "every target counts as affected")
                if then is None:
                    why = {r: f"the workspace at {base} cannot be loaded" for r in now.roots}
                else:
                    _compare(now, then, base_ws.root, changes, why)
    _close(now.nodes, why)
    roots = set(now.roots)
    targets = {lb: (now.nodes[lb].kind, why[lb]) for lb in sorted(why, key=str) if lb in roots}
    return Result(base_commit, head_commit, changes, targets, warnings)


# --- the targets and their inputs at one revision -----------------------------------------

@dataclass
class _View:
    nodes: dict[Label, Node]
    roots: list[Label]
    inputs: dict[Label, set[str]]  # rule target -> workspace-relative paths


def _evaluate(ws: Workspace, patterns: list[Pattern], *, include_manual: bool,
              rev: str | None) -> _View:
    from forge.analysis import Analyzer
    from forge.lockfile import Lockfile
    from forge.ruleset import installed
    rules = installed().load()
    # Never saved: affected writes nothing, even when it must resolve an unpinned tag.
    an = Analyzer(ws, rules, lock=Lockfile(ws.root, ws.config, rules))
    an.allow_missing_sources = True  # a target whose source was deleted is affected by that
    try:
        roots = an.expand(patterns, include_manual=include_manual)
        plan = an.analyze(roots)
    except ForgeError as e:
        if rev is not None and e.location is not None:  # git's name for the file at rev
            loc = e.location
            e.location = Location(f"{rev}:{loc.file}", loc.line, loc.col)
        raise
    loads = an.loader.loads
    package_inputs = {}
    for pkg in an.loader.packages.values():
        seen: set[str] = set()
        todo = [pkg.build_file.relative_to(ws.root).as_posix()]
        while todo:
            f = todo.pop()
            if f not in seen:
                seen.add(f)
                todo.extend(loads.get(f, ()))
        package_inputs[pkg.name] = seen
    inputs: dict[Label, set[str]] = {}
    for label, node in plan.nodes.items():
        if node.kind == SOURCE_KIND:  # a file named as a target
            inputs[label] = {_path(label)}
        if node.target is None:
            continue
        own = set(package_inputs[label.package]) | an.reads.get(label, set())
        own.update(_path(d) for d in node.deps if plan.nodes[d].kind == SOURCE_KIND)
        inputs[label] = own
    for action in an.actions:
        if action.owner in inputs:
            inputs[action.owner].update(a.path for a in action.inputs if a.source)
    return _View(plan.nodes, roots, inputs)


def _path(label: Label) -> str:
    return f"{label.package}/{label.name}" if label.package else label.name


def _hit(paths, changes: dict[str, str]) -> str | None:
    """The first changed path among `paths` or their directories (a submodule is one
    changed path for every file below it)."""
    for p in sorted(paths):
        if p in changes:
            return p
        for parent in PurePosixPath(p).parents:
            if str(parent) in changes:
                return str(parent)
    return None


def _needs_base(changes: dict[str, str]) -> bool:
    """Whether the head alone may miss something: only edits and plain additions are seen
    in the head's own inputs. A deleted file is in none of them; a new BUILD file or
    forge.toml moves a package boundary and so changes what unchanged files belong to."""
    boundary = (*BUILD_NAMES, CONFIG_NAME)
    return any(status != "changed" and not (status == "added" and p.rsplit("/", 1)[-1] not in boundary)
               for p, status in changes.items())


def _compare(now: _View, then: _View, base_root: Path, changes: dict[str, str],
             why: dict[Label, str]) -> None:
    for label, paths in now.inputs.items():
        old = then.inputs.get(label)
        if label in why or old is None:
            continue  # a target new at head is affected through its BUILD file already
        hit = _hit(old, changes)
        if hit:
            why[label] = f"{hit} {changes[hit]}"
            continue
        # An unchanged file that is an input on one side only. Checking that it exists in
        # the base tree leaves out ignored files, which only the working tree has.
        moved = sorted(p for p in paths ^ old if p not in changes and (base_root / p).exists())
        if moved:
            p = moved[0]
            why[label] = f"{p} is {'now' if p in paths else 'no longer'} one of its inputs"


def _close(nodes: dict[Label, Node], why: dict[Label, str]) -> None:
    """Add everything that depends, at head, on an affected target."""
    users: dict[Label, list[Label]] = {}
    for label, node in nodes.items():
        for d in node.deps:
            users.setdefault(d, []).append(label)
    todo = sorted(why, key=str)
    while todo:
        label = todo.pop()
        for user in users.get(label, ()):
            if user not in why:
                why[user] = f"depends on {label}"
                todo.append(user)


# --- git ------------------------------------------------------------------------------

class _Git:
    """The git repository holding a workspace; paths are relative to the workspace."""

    def __init__(self, root: Path):
        self.root = root
        out = self._run(["rev-parse", "--show-toplevel", "--show-prefix"], what="find the repository", cwd=root)
        lines = out.split("\n")
        self.top = Path(lines[0])
        self.prefix = lines[1].rstrip("/") if len(lines) > 1 else ""

    def _run(self, args: list[str], *, what: str, cwd: Path | None = None, env=None) -> str:
        try:
            p = subprocess.run(["git", *args], cwd=cwd or self.root, env=env,
                               capture_output=True, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise UsageError("forge affected needs git, and git is not installed",
                             hint="install git (Debian: apt-get install git)") from None
        if p.returncode != 0:
            err = os.fsdecode(p.stderr).strip().splitlines()
            detail = err[-1] if err else f"exit code {p.returncode}"
            if "not a git repository" in detail:
                raise UsageError(f"the workspace {self.root} is not in a git repository",
                                 hint="forge affected compares git revisions: run it in a "
                                 "git checkout")
            raise UsageError(f"git could not {what}: {detail.removeprefix('fatal: ')}")
        return os.fsdecode(p.stdout).rstrip("\n") if "-z" not in args else os.fsdecode(p.stdout)

    def commit(self, rev: str) -> str:
        if not rev or rev.startswith("-"):
            raise UsageError(f"'{rev}' is not a git revision")
        p = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--end-of-options",
                            f"{rev}^{{commit}}"], cwd=self.root, capture_output=True,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise UsageError(f"'{rev}' is not a commit of the git repository at {self.top}",
                             hint="check the name; in CI, fetch the base first (git fetch "
                             "origin main; a shallow clone needs more history: fetch-depth 0)")
        return os.fsdecode(p.stdout).strip()

    def changes(self, base: str, head: str | None) -> dict[str, str]:
        # --no-renames: a rename is its old path deleted and its new path added, and
        # both count. --relative: paths below the workspace only, relative to it.
        args = ["diff", "--name-status", "-z", "--no-renames", "--relative",
                "--ignore-submodules=none", base, *([head] if head else []), "--"]
        fields = self._run(args, what="compare the revisions").split("\0")
        out = {fields[i + 1]: _STATUS.get(fields[i][:1], "changed")
               for i in range(0, len(fields) - 1, 2)}
        if head is None:
            untracked = self._run(["ls-files", "--others", "--exclude-standard", "-z"],
                                  what="list untracked files")
            out.update((p, "added") for p in untracked.split("\0") if p)
        # forge's own outputs, when git does not ignore them, are no one's inputs
        return {p: st for p, st in sorted(out.items()) if p.split("/", 1)[0] != OUT_DIR}

    def checkout(self, commit: str, dest: Path) -> Workspace | None:
        """The workspace's tree at `commit`, written below `dest`; None when the
        workspace has no forge.toml there."""
        tree = f"{commit}:{self.prefix}" if self.prefix else commit
        # A private index: the repository's own index and work tree stay untouched.
        env = dict(os.environ, GIT_INDEX_FILE=str(dest.with_suffix(".index")))
        p = subprocess.run(["git", "read-tree", tree], cwd=self.top, env=env,
                           capture_output=True, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            return None  # the workspace's directory does not exist at that commit
        dest.mkdir(parents=True)
        self._run(["checkout-index", "--all", f"--prefix={dest}/"], what="check out "
                  f"{commit[:12]}", cwd=self.top, env=env)
        if not (dest / CONFIG_NAME).is_file():
            return None
        return Workspace(dest, load_config(dest / CONFIG_NAME, CONFIG_NAME))
