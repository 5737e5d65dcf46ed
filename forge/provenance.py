"""SLSA provenance of what a build made, written from its action graph (docs/supply-chain.md).

For a target: the subjects are its output files by sha256 (each file of a directory
output); the resolved dependencies are every input that came from outside the workspace,
as the actions that fetched them declared (Action.origins, and the file a step writes
naming what it fetched, Action.origins_file: the .deb files and indexes of a debian_rootfs
with the mirror they came from); the workspace's git commit, whether it was dirty, and
the digests of forge.toml and forge.lock are the build definition. Walking the actions
that produce the target's files finds every fetch, whatever rule planned it.

`statement_for` returns the in-toto Statement as a plain dict (forge.formats.provenance),
which `forge provenance` prints and a signer can wrap in a DSSE envelope.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import forge
from forge.formats.common.files import file_sha256
from forge.formats.provenance import slsa
from forge.labels import Label
from forge.model import OUT_PREFIX, Action
from forge.workspace import CONFIG_NAME

LOCK_NAME = "forge.lock"
SUFFIX = ".provenance.json"


def new_invocation_id() -> str:
    return str(uuid.uuid4())


def _subject_name(rel: str) -> str:
    prefix = OUT_PREFIX + "/"
    return rel[len(prefix):] if rel.startswith(prefix) else rel


class DigestMemo:
    """sha256 of output files by (size, mtime, inode), kept between builds: outputs are
    links into the cache that a no-op build leaves alone, and hashing an OS image's
    formats again each time would cost more than the rest of the no-op build."""

    def __init__(self, path: Path | None):
        self.path, self.entries, self.changed = path, {}, False
        if path is not None:
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def sha256(self, p: Path, rel: str) -> str:
        st = p.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        got = self.entries.get(rel)
        if isinstance(got, list) and got[:3] == stamp:
            return got[3]
        digest = file_sha256(p)
        self.entries[rel] = [*stamp, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.entries, sort_keys=True))
        os.replace(tmp, self.path)


def subjects(root: Path, paths: list[str], memo: DigestMemo | None = None) -> list[dict]:
    """Each file of `paths` (workspace-relative; a directory stands for every file below
    it), named by its path under forge-out/, by sha256."""
    memo = memo or DigestMemo(None)
    out = []
    for rel in dict.fromkeys(paths):
        full = root / rel
        if full.is_dir():
            for dirpath, dirs, files in os.walk(full):
                dirs.sort()
                for f in sorted(files):
                    p = Path(dirpath, f)
                    if p.is_file():
                        name = p.relative_to(root).as_posix()
                        out.append(slsa.descriptor(name=_subject_name(name),
                                                   digest={"sha256": memo.sha256(p, name)}))
        elif full.is_file():
            out.append(slsa.descriptor(name=_subject_name(rel),
                                       digest={"sha256": memo.sha256(full, rel)}))
    return out


def actions_for(actions: list[Action], paths: list[str],
                producers: dict[str, Action] | None = None) -> list[Action]:
    """The actions that produce `paths`, and those theirs need, transitively."""
    if producers is None:
        producers = producers_of(actions)
    seen: dict[str, Action] = {}
    stack = list(paths)
    while stack:
        a = producers.get(stack.pop())
        if a is None or a.id in seen:
            continue
        seen[a.id] = a
        stack.extend(i.path for i in a.inputs if not i.source)
    return [seen[k] for k in sorted(seen)]


def producers_of(actions: list[Action]) -> dict[str, Action]:
    return {o.path: a for a in actions for o in a.outputs}


def _digest(text: str) -> dict:
    algo, _, hexdigest = text.partition(":")
    return {algo: hexdigest} if hexdigest else {}


def dependencies(root: Path, actions: list[Action]) -> list[dict]:
    """What the actions fetched from outside: declared when planned, or named by the
    file a step wrote (missing when the step did not run in this workspace yet)."""
    out = []
    for a in actions:
        for name, uri, digest in a.origins:
            out.append(slsa.descriptor(name=name, uri=uri, digest=_digest(digest)))
        if a.origins_file:
            try:
                listed = json.loads((root / a.origins_file).read_text()).get("origins", [])
            except (OSError, ValueError):
                listed = []
            for o in listed:
                out.append(slsa.descriptor(name=o.get("name", ""), uri=o.get("uri", ""),
                                           digest=o.get("digest")))
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def source(root: Path) -> dict:
    """The workspace's VCS state: git commit, dirty (tracked or untracked changes below the
    workspace, forge-out/ aside), and the remote's URL when it has one."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {}
    status = _git(root, "status", "--porcelain", "--", ".", f":(exclude){OUT_PREFIX}")
    out = {"gitCommit": commit, "dirty": bool(status)}
    url = _git(root, "config", "--get", "remote.origin.url")
    if url:
        out["uri"] = url
    return out


def _file_digest(root: Path, name: str) -> dict | None:
    p = root / name
    return {"sha256": file_sha256(p)} if p.is_file() else None


def builder_id(config: dict) -> str:
    return (config.get("provenance") or {}).get("builder_id") or slsa.DEFAULT_BUILDER


class Build:
    """What every target's provenance of one build shares, found once: the graph's
    producers, the workspace's git state (a `git status` per target would cost seconds in a
    large repository), the digests of forge.toml and forge.lock."""

    def __init__(self, root: Path, config: dict, actions: list[Action]):
        self.root, self.config = root, config
        self.producers = producers_of(actions)
        self.source = source(root)
        self.configs = {n: d for n in (CONFIG_NAME, LOCK_NAME) if (d := _file_digest(root, n))}

    def needed(self, files: list[str]) -> list[Action]:
        return actions_for([], files, self.producers)

    def statement(self, label: Label, files: list[str], *, invocation_id: str,
                  started: float, finished: float, needed: list[Action] | None = None,
                  memo: DigestMemo | None = None) -> dict:
        needed = self.needed(files) if needed is None else needed
        src = self.source
        external = {"target": str(label), "configFiles": self.configs}
        if src:
            external["source"] = src
        deps = dependencies(self.root, needed)
        if src:
            deps.append(slsa.descriptor(uri=src.get("uri", ""), name="workspace",
                                        digest={"gitCommit": src["gitCommit"]}))
        internal = {"rules": sorted({a.rule for a in needed}),
                    "steps": sorted({f"{a.function or a.mnemonic}" for a in needed})}
        return slsa.statement(subjects=subjects(self.root, files, memo), external=external,
                              internal=internal, dependencies=deps,
                              builder_id=builder_id(self.config),
                              builder_version={"forge": forge.__version__},
                              invocation_id=invocation_id, started=started, finished=finished)


def statement_for(root: Path, config: dict, actions: list[Action], label: Label,
                  files: list[str], *, invocation_id: str, started: float,
                  finished: float, memo: DigestMemo | None = None) -> dict:
    """The provenance of target `label` whose outputs are `files` (workspace-relative
    paths, built), from the plan's `actions`."""
    return Build(root, config, actions).statement(label, files, invocation_id=invocation_id,
                                                  started=started, finished=finished, memo=memo)


def path_for(label: Label) -> str:
    """Where a target's provenance is written: forge-out/<pkg>/<name>.provenance.json."""
    pkg = f"{label.package}/" if label.package else ""
    return f"{OUT_PREFIX}/{pkg}{label.name}{SUFFIX}"


def dumps(statement: dict) -> bytes:
    return json.dumps(statement, indent=2, sort_keys=True).encode() + b"\n"
