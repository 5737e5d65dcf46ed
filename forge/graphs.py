"""The target graph as networkx, for `forge query` and `forge graph`."""

from __future__ import annotations

import networkx as nx

from forge.plan import Plan
from forge.labels import Label, LabelError, parse_pattern
from forge.query import QueryError


def _plain(v):
    if isinstance(v, Label):
        return str(v)
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def target_graph(plan: Plan) -> nx.DiGraph:
    g = nx.DiGraph()
    for label, node in plan.nodes.items():
        attrs = {k: _plain(v) for k, v in node.target.attrs.items()} if node.target else {}
        g.add_node(str(label), kind=node.kind, attrs=attrs)
    for label, node in plan.nodes.items():
        for d in node.deps:
            g.add_edge(str(label), str(d))
    return g


def pattern_resolver(session, graph: nx.DiGraph):
    """A query word -> the labels it names among the graph's nodes."""
    cwd_pkg = session.cwd_package()

    def resolve(word: str) -> set[str]:
        try:
            p = parse_pattern(word, cwd_pkg)
        except LabelError as e:
            raise QueryError(f"{e.message}: {e.hint}") from None
        if p.name is not None:
            label = str(Label(p.package, p.name))
            if label not in graph:
                raise QueryError(f"no target '{label}' in the workspace")
            return {label}
        out = set()
        for n, data in graph.nodes(data=True):
            if data["kind"] in ("source file", "generated file"):
                continue
            pkg = n[2:].split(":", 1)[0]
            if p.covers_package(pkg):
                out.add(n)
        return out
    return resolve
