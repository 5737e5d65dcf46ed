"""The target graph as networkx, for `forge query` and `forge graph`, and the search
for a dependency cycle in it."""

from __future__ import annotations

from collections import deque

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


def _cycle_in_scc(graph, scc: set[str]) -> list[str]:
    """Shortest cycle through the smallest label of a strongly connected set."""
    start = min(scc)
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        # Sorted so the reported cycle is the same on every run.
        for dep in sorted(graph.succ[node]):
            if dep == start:
                path: list[str] = []
                cur: str | None = node
                while cur is not None:
                    path.append(cur)
                    cur = parent[cur]
                return path[::-1] + [start]
            if dep in scc and dep not in parent:
                parent[dep] = node
                queue.append(dep)
    raise AssertionError("a strongly connected component must hold a cycle")


def find_cycle_path(graph) -> list[str] | None:
    """A dependency cycle as [a, b, ..., a], or None if the graph is acyclic.

    Only strongly connected components are searched: nx.find_cycle over the
    whole graph is far too slow on large graphs. Self-loops are checked
    first since they are the shortest cycles and form size-1 components.
    """
    loops = sorted(nx.nodes_with_selfloops(graph))
    if loops:
        return [loops[0], loops[0]]
    best: set[str] | None = None
    for scc in nx.strongly_connected_components(graph):
        if len(scc) > 1 and (best is None or min(scc) < min(best)):
            best = scc
    return None if best is None else _cycle_in_scc(graph, best)
