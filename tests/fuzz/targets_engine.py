"""Harnesses for the engine's own input files: BUILD/.bzl (Starlark), forge.toml,
forge.lock, and query expressions. Their user-facing error is `forge.errors.ForgeError`
(and `forge.query.QueryError`, which the CLI prints for `forge query`)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import networkx as nx
from hypothesis import strategies as st

from fuzz_strategies import JSONISH, SCALARS, WORDS, json_bytes, seeded, text
from fuzzlib import Harness

from forge.errors import ForgeError

REPO = Path(__file__).resolve().parents[2]


def _read(*globs: str) -> list[bytes]:
    return [p.read_bytes() for g in globs for p in sorted(REPO.glob(g)) if p.is_file()]


@functools.cache
def _rules():
    from forge.ruleset import installed
    return installed().load()


# ---- BUILD files ------------------------------------------------------------------------

_KINDS = ["genrule", "filegroup", "sh_test", "http_file", "container_image", "linuxkit_image",
          "oci_pull", "debian_rootfs", "deb_package", "kernel", "qemu_test", "oci_archive",
          "nosuch_rule", "native.genrule", "glob", "load", "select", "print", "fail", "banner"]
_ATTRS = ["name", "srcs", "outs", "cmd", "deps", "tags", "visibility", "testonly", "image",
          "url", "sha256", "bases", "assembly", "format", "suite", "packages", "modules",
          "out", "tools", "exclude", "nosuch", "**kwargs"]


def _starlark_value(depth: int = 0) -> st.SearchStrategy[str]:
    leaf = st.one_of(
        WORDS.map(json.dumps), st.integers(-2**65, 2**65).map(str),
        st.sampled_from(["True", "False", "None", '":t"', '"//p:t"', '"//..."', '"@x//y"',
                         '"$(SRCS) > $@"', '"$(location :t)"', '"$$"', 'glob(["**"])',
                         'glob(["*.txt"], exclude = ["a"])', 'native.package_name()',
                         '"a" * 3', "len([1])", "[x for x in range(3)]", "{}", "[]", "()"]))
    return st.recursive(leaf, lambda c: st.one_of(
        st.lists(c, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(WORDS.map(json.dumps), c), max_size=3).map(
            lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"),
        st.tuples(c, st.sampled_from([" + ", " % ", " * ", " // ", " == ", " if True else "]), c)
        .map("".join)), max_leaves=6)


@st.composite
def build_file(draw) -> str:
    lines = []
    if draw(st.booleans()):
        lines.append('load("//:defs.bzl", "banner")')
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(_KINDS))
        args = [f'name = "{draw(st.sampled_from(["t", "u", "t", "", "a/b", "x:y"]))}"']
        for attr in draw(st.lists(st.sampled_from(_ATTRS), max_size=4)):
            args.append(f"{attr} = {draw(_starlark_value())}" if attr != "**kwargs"
                        else "**{}")
        lines.append(f"{kind}(\n    " + ",\n    ".join(args) + ",\n)")
    return "\n".join(lines) + "\n"


_DEFS = ('def banner(name, **kwargs):\n'
         '    native.genrule(name = name, outs = [name + ".txt"], cmd = "echo > $@", **kwargs)\n')


def run_loader(data: bytes, tmp: Path) -> None:
    from forge.loader import Loader, reset_location_cache
    from forge.workspace import Workspace
    build, _, defs = data.partition(b"\0\0")
    (tmp / "forge.toml").write_bytes(b"")
    (tmp / "BUILD").write_bytes(build)
    (tmp / "defs.bzl").write_bytes(defs or _DEFS.encode())
    reset_location_cache()
    Loader(Workspace(tmp, {}), _rules()).load_package("")


# ---- forge.toml -------------------------------------------------------------------------

_SECTIONS = ["", "cache", "remote", "registries", "debian", "qemu", "nosuch", "registries.mirrors"]
_KEYS = ["salt", "jobs", "dir", "cache", "instance", "upload", "timeout", "ca_cert", "insecure",
         "mirrors", "mirror", "keyring", "accel", "nosuch", '"docker.io"', "debian"]
_TOML_VALUES = st.one_of(WORDS.map(json.dumps), st.integers(-2**70, 2**70).map(str),
                         st.sampled_from(["true", "false", "[]", '["a", 1]', "{}", "{a = 1}",
                                          "1979-05-27T07:32:00Z", "inf", "nan", "'''x'''",
                                          '"\\u0000"', "0x10", "1_000"]))


@st.composite
def toml_text(draw) -> str:
    out = []
    for section in draw(st.lists(st.sampled_from(_SECTIONS), max_size=4)):
        if section:
            out.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(_KEYS), max_size=4)):
            out.append(f"{key} = {draw(_TOML_VALUES)}")
    return "\n".join(out) + "\n"


def run_config(data: bytes, tmp: Path) -> None:
    from forge.workspace import load_config, weakened_checks
    path = tmp / "forge.toml"
    path.write_bytes(data)
    weakened_checks(load_config(path, "forge.toml"))


# ---- forge.lock -------------------------------------------------------------------------

_LOCK = st.fixed_dictionaries({"version": SCALARS, "pins": st.one_of(
    st.dictionaries(st.sampled_from(["oci", "deb", "x"]),
                    st.one_of(st.dictionaries(WORDS, st.one_of(WORDS, SCALARS), max_size=3),
                              JSONISH), max_size=3), JSONISH)})


def run_lock(data: bytes, tmp: Path) -> None:
    from forge.lockfile import Lockfile
    (tmp / "forge.lock").write_bytes(data)
    lock = Lockfile(tmp, {}, _rules(), offline=True)
    for kind, pins in list(lock.pins.items()):
        for key in list(pins):
            value = lock.get(kind, key)
            if not isinstance(value, str):  # a rule would use it as a digest or version
                raise AssertionError(f"forge.lock pin {kind}/{key} read as {value!r}")


# ---- query expressions ------------------------------------------------------------------

_LABELS = ["//:a", "//:b", "//p:c", "//p:d", "//p:src.txt"]


@functools.cache
def _graph():
    g = nx.DiGraph()
    kinds = ["genrule", "filegroup", "sh_test", "genrule", "source file"]
    for label, kind in zip(_LABELS, kinds):
        g.add_node(label, kind=kind, attrs={"tags": ["manual"], "cmd": "x", "srcs": ["//p:src.txt"]})
    g.add_edges_from([("//:a", "//:b"), ("//:b", "//p:c"), ("//p:c", "//p:src.txt"), ("//:a", "//p:d")])
    return g


def _resolve(pattern: str) -> set[str]:
    from forge.query import QueryError
    if pattern == "//...":
        return set(_LABELS)
    if pattern.startswith("//nosuch"):
        raise QueryError(f"no package '{pattern}'")
    return {label for label in _LABELS if label == pattern or label.endswith(pattern)}


_QUERY_WORDS = st.sampled_from(["deps", "rdeps", "allpaths", "somepath", "kind", "attr", "filter",
                                "labels", "set", "union", "except", "intersect", "+", "-", "^",
                                "(", ")", ",", "'", '"', "//...", "//:a", ":b", "//p:*", "1",
                                "0", "-1", "genrule", "tags", "srcs", "[", ".*", "(?P<", "//nosuch",
                                "manual", "x" * 40, "*", "\\", "é"])


@st.composite
def query_text(draw) -> str:
    def expr(depth: int) -> str:
        choice = draw(st.integers(0, 6 if depth < 4 else 1))
        if choice <= 1:
            return draw(st.sampled_from(_LABELS + ["//...", "//p:*", "'//p:c'", '"//:a"']))
        if choice == 2:
            op = draw(st.sampled_from(["+", "-", "^", "union", "except", "intersect"]))
            return f"{expr(depth + 1)} {op} {expr(depth + 1)}"
        if choice == 3:
            return f"({expr(depth + 1)})"
        if choice == 4:
            return f"set({' '.join(draw(st.lists(st.sampled_from(_LABELS), max_size=3)))})"
        fn = draw(st.sampled_from(["deps", "rdeps", "allpaths", "somepath", "kind", "attr",
                                   "filter", "labels"]))
        args = [expr(depth + 1) if draw(st.booleans()) else draw(_QUERY_WORDS)
                for _ in range(draw(st.integers(0, 4)))]
        return f"{fn}({', '.join(args)})"
    if draw(st.integers(0, 4)) == 0:
        return " ".join(draw(st.lists(_QUERY_WORDS, max_size=10)))
    return expr(0)


def run_query(data: bytes, tmp: Path) -> None:
    from forge.query import evaluate
    evaluate(data.decode("utf-8", "replace"), _graph(), _resolve)


def _query_error():
    from forge.query import QueryError
    return QueryError


HARNESSES = [
    Harness("build_files", run_loader, (ForgeError,),
            seeded(_read("examples/**/BUILD", "tests/error_cases/*/BUILD", "BUILD.example"),
                   text(build_file())),
            examples=60),
    Harness("forge_toml", run_config, (ForgeError,),
            seeded(_read("examples/**/forge.toml", "tests/error_cases/*/forge.toml"),
                   text(toml_text()))),
    Harness("forge_lock", run_lock, (ForgeError,), seeded([], json_bytes(_LOCK))),
    Harness("query", run_query, (ForgeError, _query_error()),
            seeded([b"deps(//:a, 1) - kind('source file', //...)", b"somepath(//:a, //p:c)",
                    b"attr(tags, manual, //...) + labels(srcs, //p:c)"], text(query_text())), files=False),
]
