"""Dockerfile parsing, variable scoping and the stage graph, after the official reference.

`parse()` turns text into a `Dockerfile`: global ARGs (those before the first FROM) and
stages, each a list of `Instruction`s with flags, arguments and heredoc bodies kept raw
(unexpanded). `resolve()` applies Docker's variable scoping to that for one set of
build args: global ARGs feed FROM lines only; inside a stage an ARG must be redeclared to
be seen; ENV beats ARG; build args beat ARG defaults; a stage built FROM an earlier stage
inherits its ENV (it is part of the image config) but not its ARGs. Substitution applies
to ADD, COPY, ENV, EXPOSE, FROM, LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR, ARG defaults
and COPY/ADD/RUN --mount flag values; never to RUN, CMD, ENTRYPOINT, SHELL or HEALTHCHECK
(a shell expands those at run time) nor to ONBUILD triggers (they run in a later build,
with that build's variables). The lexical layer lives in `dockerfile_lex`.

Argument shapes in `Instruction.args`: FROM `[image]` or `[image, "AS", name]`; ARG, ENV
and LABEL one `name=value` string per pair (ARG may be a bare `name`; a legacy
`ENV key value with spaces` becomes `key=value with spaces`), see `Instruction.pairs()`;
RUN/CMD/ENTRYPOINT `[command line]` in shell form or the JSON list; COPY/ADD/EXPOSE/VOLUME
one string per word (JSON form for paths with spaces); HEALTHCHECK `["NONE"]` or
`["CMD", ...]`; WORKDIR/USER/STOPSIGNAL/MAINTAINER/ONBUILD `[rest of line]`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field

from forge.formats.dockerfile.errors import DockerfileError, SubstitutionError
from forge.formats.dockerfile import lexer as lex
from forge.formats.dockerfile.lexer import substitute

INSTRUCTIONS = ("ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
                "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
                "WORKDIR")
_EXPANDED = {"ADD", "COPY", "EXPOSE", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")
_REMOTE = re.compile(r"^(https?://|git://|git@|ssh://)|\.git(#|$)")


@dataclass(frozen=True)
class Heredoc:
    """A `<<NAME` body; `expand` is False when the name was quoted (`<<"EOF"`)."""
    name: str
    content: str
    expand: bool = True
    chomp: bool = False


@dataclass(frozen=True)
class Instruction:
    """One instruction. `cmd` is upper case; `flags` maps `--name` (without dashes) to its
    value, or a list for repeatable flags (`--mount`, `--exclude`); `original` is the
    source text from `line` to `end_line`, heredoc bodies included."""
    cmd: str
    flags: dict[str, str | list[str]]
    args: list[str]
    json_form: bool
    heredocs: list[Heredoc]
    line: int
    end_line: int
    original: str
    col: int = 1

    def pairs(self) -> list[tuple[str, str | None]]:
        """ARG/ENV/LABEL arguments as (name, value); a bare ARG name has value None."""
        return [(a.partition("=")[0], a.partition("=")[2] if "=" in a else None) for a in self.args]


@dataclass(frozen=True)
class Stage:
    """A build stage. `base` and `platform` are raw text; `deps`/`external` are the stage
    references found without expanding variables (exact ones come from `resolve`)."""
    index: int
    name: str | None
    base: str
    platform: str | None
    instructions: list[Instruction]
    line: int
    deps: frozenset[int] = frozenset()
    external: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Dockerfile:
    global_args: list[tuple[str, str | None]]
    stages: list[Stage]
    directives: dict[str, str]
    escape: str = "\\"
    filename: str = "Dockerfile"
    preamble: list[Instruction] = field(default_factory=list)  # the ARGs before FROM

    def stage(self, target: str | int | None) -> Stage:
        return self.stages[_target_index(self, target)]

    def resolve(self, build_args: dict[str, str] | None = None,
                predefined: dict[str, str] | None = None) -> "ResolvedDockerfile":
        return resolve(self, build_args, predefined)


@dataclass(frozen=True)
class BaseRef:
    """What a stage starts from: kind "image" (ref is the image), "scratch", or "stage"."""
    kind: str
    ref: str
    stage: int | None = None


@dataclass(frozen=True)
class Step:
    """A resolved instruction and the variables (ARG then ENV) in effect when it runs."""
    instruction: Instruction
    env: dict[str, str]


@dataclass(frozen=True)
class ResolvedStage:
    """`used_args` maps every ARG name that can change this stage's result (read by a
    substitution, or visible to a RUN) to its value here (None: declared, unset)."""
    index: int
    name: str | None
    base: BaseRef
    platform: str | None
    steps: list[Step]
    env: dict[str, str]
    used_args: dict[str, str | None]
    deps: frozenset[int]
    external: frozenset[str]
    line: int

    @property
    def instructions(self) -> list[Instruction]:
        return [s.instruction for s in self.steps]


@dataclass(frozen=True)
class ResolvedDockerfile:
    source: Dockerfile
    stages: list[ResolvedStage]
    used_args: frozenset[str]
    unused_build_args: frozenset[str]  # Docker warns about these


# ---------------------------------------------------------------------------------------
# Parsing

def parse(text: str, filename: str = "Dockerfile") -> Dockerfile:
    """Parse Dockerfile text; raises DockerfileError with the position of the problem."""
    directives, escape, lines = lex.read(text, filename)
    preamble: list[Instruction] = []
    stages: list[dict] = []
    for ll in lines:
        ins = _instruction(ll, escape, filename)
        if ins.cmd == "FROM":
            name = ins.args[2].lower() if len(ins.args) == 3 else None
            if name and not _STAGE_NAME.match(name):
                raise DockerfileError(f"invalid stage name '{ins.args[2]}': use a letter, then letters, "
                                      "digits, '-', '_' or '.'", ins.line, ins.col, filename)
            for other in stages:
                if name and other["name"] == name:
                    raise DockerfileError(f"duplicate stage name '{name}' (first used on line "
                                          f"{other['line']})", ins.line, ins.col, filename)
            stages.append({"index": len(stages), "name": name, "base": ins.args[0],
                           "platform": ins.flags.get("platform"), "instructions": [],
                           "line": ins.line})
        elif stages:
            stages[-1]["instructions"].append(ins)
        elif ins.cmd == "ARG":
            preamble.append(ins)
        else:
            raise DockerfileError(f"{ins.cmd} before the first FROM; only ARG may come before FROM",
                                  ins.line, ins.col, filename)
    if not stages:
        raise DockerfileError("no FROM instruction: a Dockerfile needs at least one stage", 1, 1, filename)
    names = {s["name"]: s["index"] for s in stages if s["name"]}
    built = []
    for s in stages:
        deps, external = set(), set()
        base = names.get(s["base"].lower())
        if base is not None and base < s["index"]:
            deps.add(base)
        for ins, ref in _refs(s["instructions"]):
            if "$" not in ref:
                _add_ref(ref, names, s["index"], ins, filename, deps, external)
        built.append(Stage(**s, deps=frozenset(deps), external=frozenset(external)))
    return Dockerfile([p for ins in preamble for p in ins.pairs()], built, directives, escape,
                      filename, preamble)


def _instruction(ll: lex.LogicalLine, esc: str, filename: str, base: int = 0) -> Instruction:
    text = ll.text
    m = re.compile(r"\s*(\S+)").match(text, base)
    if m is None:  # only an ONBUILD's flags, no trigger after them
        line, col = ll.pos(base)
        raise DockerfileError("ONBUILD needs an instruction after it", line, col, filename)
    word, start = m[1], m.start(1)

    def fail(message: str, offset: int = start):
        line, col = ll.pos(offset)
        raise DockerfileError(message, line, col, filename)

    cmd = word.upper()
    if cmd not in INSTRUCTIONS:
        close = difflib.get_close_matches(cmd, INSTRUCTIONS, 1, 0.6)
        fail(f"unknown instruction '{word}'" + (f"; did you mean '{close[0]}'?" if close else ""))
    flag_words, off = lex.extract_flags(text[m.end():])
    flag_words = [(w, o + m.end()) for w, o in flag_words]
    flags = lex.parse_flags(cmd, flag_words, fail)
    off += m.end()
    rest = text[off:].rstrip()
    args, json_form = [rest], False
    if not rest and cmd != "HEALTHCHECK":
        fail("FROM needs an image" if cmd == "FROM" else f"{cmd} requires at least one argument")
    if cmd in ("RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME"):
        parsed = lex.json_form(rest, lambda msg: fail(msg, off))
        if parsed is not None:
            args, json_form = parsed, True
        elif cmd == "SHELL":
            fail('SHELL requires the arguments in JSON form, e.g. SHELL ["/bin/sh", "-c"]', off)
        elif cmd in ("COPY", "ADD", "VOLUME"):
            args = rest.split()
        if cmd in ("COPY", "ADD") and len(args) < 2:
            fail(f"{cmd} requires at least two arguments, but only one was provided. "
                 "Destination could not be determined.")
        if cmd == "VOLUME" and (not args or "" in args):
            fail("VOLUME specified can not be an empty string", off)
    elif cmd in ("FROM", "EXPOSE"):
        args = rest.split()
        if cmd == "FROM" and not (len(args) == 1 or (len(args) == 3 and args[1].upper() == "AS")):
            fail(f"FROM takes 'image [AS name]', got '{rest}'", off)
        if len(args) == 3:
            args[1] = "AS"
    elif cmd in ("ARG", "ENV", "LABEL"):
        args = _name_values(cmd, rest, esc, lambda msg, o: fail(msg, off + o))
    elif cmd == "HEALTHCHECK":
        at = {w[2:].partition("=")[0]: o for w, o in flag_words}
        args, json_form = _healthcheck(rest, flags, lambda msg, flag=None: fail(msg, at.get(flag, off)))
    elif cmd == "ONBUILD":
        trigger = _instruction(ll, esc, filename, off)
        if trigger.cmd in ("ONBUILD", "FROM", "MAINTAINER"):
            fail(f"{trigger.cmd} isn't allowed as an ONBUILD trigger", off)
    heredocs = [Heredoc(h.name, h.content, h.expand, h.chomp) for h in ll.heredocs]
    line, col = ll.pos(start)
    return Instruction(cmd, flags, args, json_form, heredocs, ll.line, ll.end_line, ll.original, col)


def _name_values(cmd: str, rest: str, esc: str, fail) -> list[str]:
    words = lex.split_words(rest, esc)
    if cmd != "ARG" and "=" not in words[0][0]:
        parts = rest.split(None, 1)
        if len(parts) < 2:
            fail(f"{cmd} needs a value: '{cmd} {parts[0]}=<value>' (or the legacy "
                 f"'{cmd} {parts[0]} <value>')", 0)
        return [f"{parts[0]}={parts[1]}"]
    for word, offset in words:
        if cmd != "ARG" and "=" not in word:
            fail(f"{cmd} syntax error: can't find '=' in '{word}'; mixing 'name=value' and "
                 "'name value' forms is not allowed", offset)
        if not word.partition("=")[0]:
            fail(f"{cmd} names can not be blank", offset)
    return [w for w, _ in words]


def _healthcheck(rest: str, flags: dict, fail) -> tuple[list[str], bool]:
    words = rest.split(None, 1)
    kind = words[0].upper() if words else ""
    if kind == "NONE":
        if len(words) > 1 or flags:
            fail("HEALTHCHECK NONE takes no arguments or flags")
        return ["NONE"], False
    if kind != "CMD":
        fail(f"HEALTHCHECK takes 'NONE' or '[options] CMD command', got '{rest}'")
    if len(words) < 2:
        fail("HEALTHCHECK CMD requires a command")
    for name, value in flags.items():
        ok = value.isdigit() if name == "retries" else bool(lex.DURATION.match(value))
        if not ok:
            want = "a non-negative integer" if name == "retries" else "a duration such as 30s or 1m30s"
            fail(f"--{name} must be {want}, got '{value}'", name)
    parsed = lex.json_form(words[1], fail)
    return (["CMD", *parsed], True) if parsed is not None else (["CMD", words[1]], False)


# ---------------------------------------------------------------------------------------
# Stage references

def _refs(instructions: list[Instruction]):
    for ins in instructions:
        if ins.cmd in ("COPY", "ADD") and "from" in ins.flags:
            yield ins, ins.flags["from"]
        if ins.cmd == "RUN":
            for spec in ins.flags.get("mount", []):
                opts = lex.mount_options(spec)
                if "from" in opts and opts["type"] in ("bind", "cache"):
                    yield ins, opts["from"]


def _add_ref(ref: str, names: dict[str, int], current: int, ins: Instruction, filename: str,
             deps: set[int], external: set[str]) -> None:
    index = int(ref) if ref.isdigit() else names.get(ref.lower())
    if index is None:
        external.add(ref)
        return
    if index >= current:
        what = "this stage" if index == current else "a later stage"
        raise DockerfileError(f"--from={ref} refers to {what} ({index}); a stage can only use "
                              "stages defined before it", ins.line, ins.col, filename)
    deps.add(index)


def stage_deps(stage: Stage | ResolvedStage) -> set[int]:
    """Indices of earlier stages this stage uses (FROM, --from, RUN --mount from=)."""
    return set(stage.deps)


def external_refs(stage: Stage | ResolvedStage) -> set[str]:
    """Image references named by --from / mount from= that are not stages."""
    return set(stage.external)


def _target_index(df: Dockerfile, target: str | int | None) -> int:
    if target is None:
        return len(df.stages) - 1
    if isinstance(target, int) and 0 <= target < len(df.stages):
        return target
    for s in df.stages:
        if s.name == str(target).lower():
            return s.index
    names = [s.name for s in df.stages if s.name]
    close = difflib.get_close_matches(str(target).lower(), names, 1, 0.6)
    raise DockerfileError(f"target stage '{target}' not found; stages are: "
                          + (", ".join(names) or "(none named)")
                          + (f"; did you mean '{close[0]}'?" if close else ""), filename=df.filename)


def needed_stages(dockerfile: Dockerfile | ResolvedDockerfile, target: str | int | None = None,
                  build_args: dict[str, str] | None = None) -> list[int]:
    """Stages needed to build `target` (None: the last stage), dependencies first.

    A plain Dockerfile is resolved with `build_args` first, so `--from=$X` counts."""
    resolved = dockerfile if isinstance(dockerfile, ResolvedDockerfile) else resolve(dockerfile, build_args)
    seen: set[int] = set()
    todo = [_target_index(resolved.source, target)]
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend(resolved.stages[i].deps)
    return sorted(seen)  # a stage only uses earlier ones, so index order is dependency order


# ---------------------------------------------------------------------------------------
# Resolution

def resolve(df: Dockerfile, build_args: dict[str, str] | None = None,
            predefined: dict[str, str] | None = None) -> ResolvedDockerfile:
    """Expand variables with Docker's scoping. `predefined` are the automatic global ARGs
    (TARGETPLATFORM, BUILDARCH, ...): usable in FROM, and by a bare `ARG NAME` in a stage."""
    build_args, genv = dict(build_args or {}), dict(predefined or {})
    declared_global, consumed = set(genv), set()

    def sub(word, scope, used, ins, quotes=True):
        try:
            return substitute(word, scope, df.escape, quotes=quotes, used=used)
        except SubstitutionError as e:
            raise DockerfileError(str(e), ins.line, ins.col, df.filename) from None

    for ins in df.preamble:
        for name, default in ins.pairs():
            declared_global.add(name)
            consumed.add(name)
            if name in build_args:
                genv[name] = build_args[name]
            elif default is not None:
                genv[name] = sub(default, genv, None, ins)
    names = {s.name: s.index for s in df.stages if s.name}
    out: list[ResolvedStage] = []
    for st in df.stages:
        from_ins = Instruction("FROM", {}, [], False, [], st.line, st.line, "")
        used: set[str] = set()
        base = sub(st.base, genv, used, from_ins)
        platform = sub(st.platform, genv, used, from_ins) if st.platform else None
        used_args: dict[str, str | None] = {n: genv.get(n) for n in used if n in declared_global}
        if not base:
            raise DockerfileError(f"FROM needs an image: '{st.base}' expands to nothing",
                                  st.line, 1, df.filename)
        idx = names.get(base.lower())
        deps, external = set(), set()
        if idx is not None and idx < st.index:
            ref, env = BaseRef("stage", base.lower(), idx), dict(out[idx].env)
            deps.add(idx)
        else:
            ref, env = BaseRef("scratch" if base == "scratch" else "image", base), {}
        args: dict[str, str] = {}
        declared: set[str] = set()
        steps: list[Step] = []
        for ins in st.instructions:
            scope, used = {**args, **env}, set()
            new = ins
            if ins.cmd == "ARG":
                resolved_args = []
                for name, default in ins.pairs():
                    declared.add(name)
                    consumed.add(name)
                    value = (build_args[name] if name in build_args else
                             sub(default, scope, used, ins) if default is not None else genv.get(name))
                    if value is None:
                        args.pop(name, None)
                        resolved_args.append(name)
                    else:
                        args[name] = value
                        resolved_args.append(f"{name}={value}")
                new = dataclasses.replace(ins, args=resolved_args)
            elif ins.cmd in ("ENV", "LABEL"):
                pairs = [(sub(k, scope, used, ins), sub(v or "", scope, used, ins)) for k, v in ins.pairs()]
                if ins.cmd == "ENV":
                    env.update(pairs)
                new = dataclasses.replace(ins, args=[f"{k}={v}" for k, v in pairs])
            elif ins.cmd in _EXPANDED or ins.cmd == "RUN":
                flags = {k: ([sub(x, scope, used, ins) for x in v] if isinstance(v, list)
                             else sub(v, scope, used, ins)) for k, v in ins.flags.items()}
                new_args = ins.args if ins.cmd == "RUN" else [sub(a, scope, used, ins) for a in ins.args]
                heredocs = ins.heredocs if ins.cmd == "RUN" else [
                    dataclasses.replace(h, content=sub(h.content, scope, used, ins, quotes=False))
                    if h.expand else h for h in ins.heredocs]
                new = dataclasses.replace(ins, flags=flags, args=new_args, heredocs=heredocs)
            seen = (used | declared) if ins.cmd == "RUN" else used
            used_args.update({n: args.get(n) for n in seen if n in declared and n not in env})
            steps.append(Step(new, scope))
        for (ins, value), (_, raw) in zip(_refs([s.instruction for s in steps]), _refs(st.instructions)):
            if not value:
                raise DockerfileError(f"--from={raw} expands to nothing", ins.line, ins.col, df.filename)
            _add_ref(value, names, st.index, ins, df.filename, deps, external)
        out.append(ResolvedStage(st.index, st.name, ref, platform, steps, env, used_args,
                                 frozenset(deps), frozenset(external), st.line))
    return ResolvedDockerfile(df, out, frozenset(n for s in out for n in s.used_args),
                              frozenset(set(build_args) - consumed))


# ---------------------------------------------------------------------------------------
# Build-context inputs

def _sources(ins: Instruction) -> list[str]:
    names = {h.name for h in ins.heredocs}
    return [a for a in ins.args[:-1]
            if not any(w[0] in names for w in lex.heredoc_words(a))]


def context_sources(stage: Stage | ResolvedStage) -> list[tuple[Instruction, list[str]]]:
    """Source patterns, relative to the build context, read by each COPY/ADD without --from.

    Heredoc sources are not files and are left out. ADD from a URL or git repository
    fetches at build time, which is hermetic only when pinned, so an unpinned one raises
    DockerfileError here; pinned ones (`ADD --checksum=sha256:...`) are listed by
    `remote_sources` instead. Pass a ResolvedStage to get expanded patterns.
    """
    out = []
    for ins in stage.instructions:
        if ins.cmd not in ("COPY", "ADD") or "from" in ins.flags:
            continue
        sources = _sources(ins)
        if ins.cmd == "ADD":
            for url in [s for s in sources if _REMOTE.search(s)]:
                if "checksum" not in ins.flags:
                    raise DockerfileError(
                        f"ADD {url} downloads at build time, which is not hermetic; pin it with "
                        "--checksum=sha256:<digest>, or fetch it in its own rule and COPY it",
                        ins.line, ins.col)
            sources = [s for s in sources if not _REMOTE.search(s)]
        if sources:
            out.append((ins, sources))
    return out


def remote_sources(stage: Stage | ResolvedStage) -> list[tuple[Instruction, str, str | None]]:
    """(instruction, url, checksum) for each ADD of a URL or git repository."""
    return [(ins, s, ins.flags.get("checksum")) for ins in stage.instructions
            if ins.cmd == "ADD" for s in _sources(ins) if _REMOTE.search(s)]
