"""Analysis: resolve labels into the target graph, then ask each rule for its actions.

The walk is an iterative depth-first post-order over targets (deep chains would
overflow Python's recursion), which also finds dependency cycles as paths.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

from forge.errors import AnalysisError, ForgeError, LoadError, did_you_mean
from forge.formats.errors import FormatError
from forge.labels import Label, LabelError, Pattern, parse_label
from forge.loader import Loader, Target
from forge.model import OUT_PREFIX, Action, Artifact, RuleType, SourceReader, TargetInfo
from forge.plan import GENERATED_KIND, SOURCE_KIND, Node, Plan
from forge.ruleset import RuleSet, installed
from forge.workspace import Workspace, discover_packages



class AnalysisContext:
    """What a rule's analysis function receives; see forge.api for an example."""

    def __init__(self, analyzer: "Analyzer", target: Target, rule: RuleType):
        self._an = analyzer
        self._target = target
        self.rule = rule
        self.label = target.label
        self.package = target.label.package
        self.attr = SimpleNamespace(**target.attrs)
        self.actions: list[Action] = []

    # dependencies
    def dep(self, label: Label) -> TargetInfo:
        return self._an.infos[label]

    def deps(self, attr_name: str) -> list[TargetInfo]:
        v = getattr(self.attr, attr_name)
        if v is None:
            return []
        labels = v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else [v]
        return [self._an.infos[lb] for lb in labels]

    def files(self, attr_name: str) -> list[Artifact]:
        out: list[Artifact] = []
        for info in self.deps(attr_name):
            out.extend(info.files)
        return out

    # outputs and actions
    def declare(self, name: str) -> Artifact:
        pkg = f"{self.package}/" if self.package else ""
        return Artifact(f"{OUT_PREFIX}/{pkg}{name}", source=False)

    def declare_dir(self, name: str) -> Artifact:
        """A directory output: the action creates it and fills it with files."""
        return Artifact(self.declare(name).path, source=False, directory=True)

    def run(self, argv, *, inputs, outputs, mnemonic: str, env: dict | None = None,
            tools=(), pool: str | None = None, executable=(), description: str = "",
            timeout: float | None = None, local: str = "") -> Action:
        return self._add(Action(self.label, mnemonic, self.rule.key, tuple(dict.fromkeys(inputs)),
                                tuple(outputs), argv=tuple(argv), env=tuple(sorted((env or {}).items())),
                                tools=tuple(tools), pool=pool,
                                executable=tuple(a.path for a in executable),
                                description=description or f"{mnemonic} {self.label}",
                                timeout=timeout, local=local))

    def run_shell(self, cmd: str, **kw) -> Action:
        kw["tools"] = ("bash", *kw.get("tools", ()))
        return self.run(["bash", "-c", cmd], **kw)

    def call(self, function: str, params, *, inputs, outputs, mnemonic: str,
             pool: str | None = None, description: str = "", executable=(), tools=(),
             local: str = "", origins=(), origins_file: Artifact | None = None) -> Action:
        """`local`: see Action.local (why the step depends on this machine); `origins`
        and `origins_file`: see Action.origins (where what it fetches comes from)."""
        return self._add(Action(self.label, mnemonic, self.rule.key, tuple(dict.fromkeys(inputs)),
                                tuple(outputs), function=function, params=params, pool=pool, tools=tuple(tools),
                                executable=tuple(a.path for a in executable),
                                description=description or f"{mnemonic} {self.label}", local=local,
                                origins=tuple(tuple(o) for o in origins),
                                origins_file=origins_file.path if origins_file else ""))

    def _add(self, action: Action) -> Action:
        if not action.outputs:
            raise self.fail(f"action {action.mnemonic} declares no outputs")
        self.actions.append(action)
        return action

    def info(self, files=(), executable: Artifact | None = None, runfiles=(), **extra) -> TargetInfo:
        return TargetInfo(tuple(files), executable, tuple(runfiles), extra)

    # user files read at analysis time (Dockerfiles, assemblies) and $(location)
    def read_source(self, artifact: Artifact) -> str:
        path = self._an.ws.root / artifact.path
        self._an.loader.remember(path)
        self._an.reads.setdefault(self.label, set()).add(artifact.path)
        return path.read_text()

    def optional_source(self, name: str) -> Artifact | None:
        """A file of this package that may not exist (e.g. `.dockerignore`); the plan
        cache notices when it appears or goes (its directory's mtime is recorded)."""
        d = self._an.ws.root / self.package if self.package else self._an.ws.root
        self._an.loader.dirs[self.package] = d.stat().st_mtime_ns
        self._an.reads.setdefault(self.label, set()).add(_join(self.package, name))
        if (d / name).is_file():
            self._an.loader.remember(d / name)
            return Artifact(_join(self.package, name))
        return None

    def source_file(self, path: str) -> Artifact:
        """A file of the workspace named by its workspace-relative path inside a source
        file (an assembly's `source:`), as an input. FileNotFoundError if it is missing;
        its directory's mtime is recorded so the plan notices it appearing or going."""
        p = self._an.ws.root / path
        self._an.reads.setdefault(self.label, set()).add(path)
        d = p.parent
        self._an.loader.dirs[d.relative_to(self._an.ws.root).as_posix().lstrip(".")] = \
            d.stat().st_mtime_ns if d.is_dir() else 0
        if not p.is_file():
            raise FileNotFoundError(path)
        return Artifact(p.relative_to(self._an.ws.root).as_posix())

    def read_file(self, path: str) -> bytes:
        """The bytes of a file the rule must read to plan: workspace-relative (a source
        file), or absolute (a host file, e.g. a system keyring). The plan cache rechecks
        its stat, so changing it plans again; OSError if it cannot be read."""
        p = self._an.ws.root / path
        data = p.read_bytes()
        self._an.loader.remember(p)
        if not Path(path).is_absolute():
            self._an.reads.setdefault(self.label, set()).add(path)
        return data

    def host_file(self, path: str) -> bytes | None:
        """The bytes of a file outside the workspace (absolute path), or None if it does not
        exist or cannot be read. Either way the plan cache notices a change: the file's
        stat is recorded, or, when it is missing, the mtime of its nearest existing
        directory (where it, or a directory on its way, would appear)."""
        p = Path(path)
        try:
            data = p.read_bytes()
            self._an.loader.remember(p)
            return data
        except OSError:
            d = p.parent
            while not d.is_dir() and d != d.parent:
                d = d.parent
            try:
                self._an.loader.dirs[self._an.loader._rel(d)] = d.stat().st_mtime_ns
            except OSError:
                pass
            if p.exists():  # there but unreadable: its stat still tells a change
                try:
                    self._an.loader.remember(p)
                except OSError:
                    pass
            return None

    def list_dir(self, path: str) -> list[str]:
        """The names in a directory read while planning (workspace-relative or absolute);
        the plan cache notices entries appearing or going (its mtime is recorded)."""
        p = self._an.ws.root / path
        names = os.listdir(p)
        self._an.loader.dirs[self._an.loader._rel(p)] = p.stat().st_mtime_ns
        return names

    def lstat(self, path: str) -> os.stat_result:
        """The lstat of a workspace path read while planning, for rules whose plan depends
        on a file's mode or link-ness (a LinuxKit package's git tree hash)."""
        st = (self._an.ws.root / path).lstat()
        self._an.reads.setdefault(self.label, set()).add(path)
        return st

    def readlink(self, path: str) -> str:
        """The target of a workspace symlink read while planning (its directory's mtime
        is recorded, so a new target plans again)."""
        p = self._an.ws.root / path
        self._an.loader.dirs[self._an.loader._rel(p.parent)] = p.parent.stat().st_mtime_ns
        return os.readlink(p)

    def pin(self, kind: str, key: str) -> str:
        """The pinned value for a floating reference (see forge.lockfile), e.g.
        `ctx.pin("oci", "registry.example.com/library/alpine:3.20")` -> its digest."""
        return self._an.lock.get(kind, key)

    @property
    def workspace_root(self) -> Path:
        """Where the workspace is on this machine: to tell a host path inside it from one
        outside (an assembly's `source: /abs/path`). Never put it in an action's key."""
        return self._an.ws.root

    @property
    def config(self) -> dict:
        """The workspace's forge.toml, for settings a rule reads while planning."""
        return self._an.ws.config

    def location_map(self, attr_names) -> dict[str, list[Artifact]]:
        """Label text -> files, for `$(location ...)` over the labels of `attr_names`."""
        out: dict[str, list[Artifact]] = {}
        for a in attr_names:
            v = getattr(self.attr, a)
            labels = v if isinstance(v, list) else [v] if v else []
            for lb in labels:
                files = list(self._an.infos[lb].files)
                for text in (str(lb), lb.short, f":{lb.name}", lb.name):
                    out.setdefault(text, files)
        return out

    def fail(self, message: str, attr: str | None = None, hint: str | None = None) -> AnalysisError:
        loc = self._target.attr_location(attr) if attr else self._target.location
        return AnalysisError(message, location=loc, hint=hint)


class Analyzer:
    def __init__(self, ws: Workspace, rules: RuleSet | None = None,
                 lock: "Lockfile | None" = None):
        from forge.lockfile import Lockfile
        self.ws = ws
        rule_set = rules if rules is not None else installed().load()
        self.lock = lock or Lockfile(ws.root, ws.config, rule_set)
        self.rules = rule_set.rules
        self.loader = Loader(ws, rule_set)
        self.nodes: dict[Label, Node] = {}
        self.infos: dict[Label, TargetInfo] = {}
        self.actions: list[Action] = []
        self._producers: dict[str, Action] = {}
        # Files each target's rule read or looked for while planning (forge affected).
        self.reads: dict[Label, set[str]] = {}
        # forge affected: a source file a target names but that is gone is still an input
        # (the change that deleted it affects the target), not an error.
        self.allow_missing_sources = False

    # --- patterns -------------------------------------------------------------------

    def expand(self, patterns: list[Pattern], *, include_manual: bool = False) -> list[Label]:
        labels: list[Label] = []
        for p in patterns:
            if p.recursive:
                pkgs, dirs = discover_packages(self.ws, p.package)
                self.loader.dirs.update(dirs)
                if not pkgs and not (self.ws.root / p.package).is_dir():
                    raise LoadError(f"no package matches '{p}': {p.package}/ does not exist")
            else:
                pkgs = [p.package]
            for pkg in pkgs:
                package = self.loader.load_package(pkg)
                if p.name is None:
                    labels.extend(t.label for t in package.targets.values()
                                  if include_manual or "manual" not in t.attrs.get("tags", []))
                else:
                    labels.append(self.resolve(Label(pkg, p.name), None, None))
        return list(dict.fromkeys(labels))

    # --- the target graph -----------------------------------------------------------

    def resolve(self, label: Label, owner: Target | None, attr: str | None) -> Label:
        """Make sure `label` names something; add its node to the graph."""
        if label in self.nodes:
            return label
        where = owner.attr_location(attr) if owner and attr else None
        try:
            pkg = self.loader.load_package(label.package)
        except LoadError as e:
            if where is None:
                raise
            raise LoadError(e.message, location=where, hint=e.hint) from None
        if label.name in pkg.targets:
            t = pkg.targets[label.name]
            self.nodes[label] = Node(label, t.kind, target=t)
        elif label.name in pkg.outputs:
            self.nodes[label] = Node(label, GENERATED_KIND, deps=[pkg.outputs[label.name]])
        else:
            path = self.ws.root / label.package / label.name
            if path.is_file():
                # Existence, not content, shapes the plan: the directory's mtime tells.
                parent = path.parent
                self.loader.dirs[parent.relative_to(self.ws.root).as_posix().lstrip(".")] = \
                    parent.stat().st_mtime_ns
                self.nodes[label] = Node(label, SOURCE_KIND)
            elif self.allow_missing_sources and owner is not None:
                self.nodes[label] = Node(label, SOURCE_KIND)
            else:
                names = list(pkg.targets) + list(pkg.outputs)
                rel = _join(label.package, label.name)
                raise LoadError(
                    f"'{label}' names no target of //{label.package} and no file {rel}"
                    + (f" (in '{attr}' of {owner.label})" if owner and attr
                       else f" (named by {owner.label})" if owner else ""),
                    location=where,
                    hint=did_you_mean(label.name, names)
                    or f"//{label.package} defines: {', '.join(sorted(names)[:12]) or 'nothing'}")
        return label

    def _deps_of(self, node: Node) -> list[Label]:
        t = node.target
        if t is None:
            for d in node.deps:
                self.resolve(d, None, None)
            return node.deps
        rule = self.rules[t.kind]
        deps: list[Label] = []
        for name, spec in rule.attrs.items():
            if not spec.is_label:
                continue
            v = t.attrs[name]
            try:
                if spec.type == "label":
                    if v:
                        lb = parse_label(v, t.label.package) if isinstance(v, str) else v
                        t.attrs[name] = lb
                        deps.append(lb)
                elif spec.type == "label_list":
                    lbs = [parse_label(x, t.label.package) if isinstance(x, str) else x for x in v]
                    t.attrs[name] = lbs
                    deps.extend(lbs)
                else:
                    lbd = {k: parse_label(x, t.label.package) if isinstance(x, str) else x
                           for k, x in v.items()}
                    t.attrs[name] = lbd
                    deps.extend(lbd.values())
            except LabelError as e:
                raise LoadError(f"attribute '{name}' of {t.label}: {e.message}",
                                location=t.attr_location(name), hint=e.hint) from None
            for lb in deps:
                self.resolve(lb, t, name)
        if rule.implicit_deps is not None:
            deps.extend(self._implicit_deps(t, rule))
        node.deps = list(dict.fromkeys(deps))
        return node.deps

    def _implicit_deps(self, t: Target, rule: RuleType) -> list[Label]:
        def path(text: str) -> str:
            lb = parse_label(text, t.label.package) if isinstance(text, str) else text
            return _join(lb.package, lb.name)

        def read(text: str) -> str:
            p = self.ws.root / path(text)
            self.loader.remember(p)
            self.reads.setdefault(t.label, set()).add(path(text))
            return p.read_text()

        reader = SourceReader(t.label.package, SimpleNamespace(**t.attrs), read, path)
        try:
            found = rule.implicit_deps(reader)
        except ForgeError as e:
            raise e.with_location(t.location) from None
        out = []
        for text, where in found:
            try:
                lb = parse_label(text, t.label.package)
            except LabelError as e:
                raise LoadError(e.message, location=where, hint=e.hint) from None
            try:
                self.resolve(lb, t, None)
            except LoadError as e:
                e.location = where or e.location  # the line in the source file naming it
                raise
            out.append(lb)
        return out

    def analyze(self, roots: list[Label]) -> Plan:
        state: dict[Label, int] = {}
        for root in roots:
            if state.get(root) == 2:
                continue
            self.resolve(root, None, None)
            state[root] = 1
            path = [root]
            stack = [(root, iter(self._deps_of(self.nodes[root])))]
            while stack:
                label, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    stack.pop()
                    path.pop()
                    state[label] = 2
                    self._analyze_one(self.nodes[label])
                    continue
                s = state.get(nxt)
                if s == 2:
                    continue
                if s == 1:
                    cycle = path[path.index(nxt):] + [nxt]
                    first = self.nodes[cycle[0]].target
                    hint = "a target cannot depend on itself, directly or not"
                    if len(cycle) == 2 and (self.ws.root / cycle[0].package / cycle[0].name).exists():
                        hint = (f"'{cycle[0].name}' names the target {cycle[0]}, which shadows the "
                                f"file {_join(cycle[0].package, cycle[0].name)}; rename the target "
                                "or the file")
                    raise LoadError("dependency cycle: " + " -> ".join(map(str, cycle)),
                                    location=first.location if first else None, hint=hint)
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(self._deps_of(self.nodes[nxt]))))
        tests = [r for r in roots if self.nodes[r].target and self.rules[self.nodes[r].kind].test]
        return Plan(roots, self.nodes, self.infos, self._needed(roots), tests)

    def _analyze_one(self, node: Node) -> None:
        label = node.label
        if node.kind == SOURCE_KIND:
            self.infos[label] = TargetInfo((Artifact(_join(label.package, label.name)),))
            return
        if node.kind == GENERATED_KIND:
            owner = self.infos[node.deps[0]]
            path = f"{OUT_PREFIX}/{_join(label.package, label.name)}"
            self.infos[label] = TargetInfo(tuple(a for a in owner.files if a.path == path)
                                           or (Artifact(path, source=False),))
            return
        t = node.target
        rule = self.rules[t.kind]
        ctx = AnalysisContext(self, t, rule)
        try:
            info = rule.impl(ctx)
        except ForgeError as e:
            raise e.with_location(t.location) from None
        except FormatError as e:  # e.g. a pinned index that does not verify: bad input
            raise AnalysisError(f"{label}: {e}", location=t.location,
                                hint=getattr(e, "hint", None)) from None
        for a in ctx.actions:
            for out in a.outputs:
                prev = self._producers.get(out.path)
                if prev is not None:
                    raise AnalysisError(f"{out.path} is an output of both {prev.owner} and {a.owner}",
                                        location=t.location)
                self._producers[out.path] = a
        self.actions.extend(ctx.actions)
        self.infos[label] = info or TargetInfo()

    def _needed(self, roots: list[Label]) -> list[Action]:
        """The actions that produce the roots' files, producers first."""
        wanted: list[str] = []
        for r in roots:
            info = self.infos[r]
            wanted.extend(a.path for a in (*info.files, *info.runfiles) if not a.source)
            if info.executable and not info.executable.source:
                wanted.append(info.executable.path)
        order: list[Action] = []
        seen: set[str] = set()
        stack = [(p, False) for p in reversed(wanted)]
        while stack:
            path, expanded = stack.pop()
            act = self._producers.get(path)
            if act is None:
                continue
            if expanded:
                if act.id not in seen:
                    seen.add(act.id)
                    order.append(act)
                continue
            if act.id in seen:
                continue
            stack.append((path, True))
            stack.extend((i.path, False) for i in act.inputs if not i.source)
        return order


def _join(pkg: str, name: str) -> str:
    return f"{pkg}/{name}" if pkg else name


LOCATION_RE = re.compile(r"\$\((locations?|execpaths?|rootpaths?) ([^)]+)\)")
