"""Output formats for query results, plus dependency-cycle discovery.

Every formatter takes the result set of ``forge.query.evaluate`` and the
graph it ran against, and returns text; none of them prints. Output is
sorted by label so it is byte-for-byte stable across runs (Python's set
order depends on the string hash seed).

    format_labels    one label per line
    format_json      [{"label", "kind", "deps"}], deps being all direct deps
    format_dot       Graphviz digraph of the induced subgraph
    format_mermaid   Mermaid "graph LR" flowchart of the induced subgraph
    render_svg       DOT text -> SVG bytes via the Graphviz `dot` binary
    find_cycle_path  one dependency cycle [a, b, ..., a], or None
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import deque

import networkx as nx

from .query import QueryError

__all__ = ["format_labels", "format_json", "format_dot", "format_mermaid",
           "render_svg", "find_cycle_path"]


def _kind(graph, label: str) -> str | None:
    return graph.nodes[label].get("kind") if label in graph else None


def _edges(labels: set[str], graph) -> list[tuple[str, str]]:
    """Edges of the subgraph induced by `labels`, sorted.

    Built from adjacency lookups instead of graph.subgraph(): subgraph views
    filter lazily on every access and are slow on large graphs.
    """
    succ = graph.succ
    return sorted((u, v) for u in labels if u in succ
                  for v in succ[u] if v in labels)


def format_labels(labels: set[str], graph) -> str:
    """Sorted labels, one per line, newline-terminated ("" when empty)."""
    return "".join(f"{label}\n" for label in sorted(labels))


def format_json(labels: set[str], graph) -> str:
    """A JSON list of {"label", "kind", "deps"} sorted by label.

    "deps" lists every direct dependency in the graph, not only those in the
    result, so each entry fully describes its target.
    """
    out = [{"label": label,
            "kind": _kind(graph, label),
            "deps": sorted(graph.succ[label]) if label in graph else []}
           for label in sorted(labels)]
    return json.dumps(out, indent=2) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_dot(labels: set[str], graph) -> str:
    lines = ["digraph forge {", "  node [shape=box];"]
    # Every node is listed, not just edge endpoints, so isolated results show.
    lines += [f"  {_dot_quote(label)};" for label in sorted(labels)]
    lines += [f"  {_dot_quote(u)} -> {_dot_quote(v)};"
              for u, v in _edges(labels, graph)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def format_mermaid(labels: set[str], graph) -> str:
    # Labels contain characters (/ : @) Mermaid rejects in node ids, so ids
    # are synthetic and the label is shown as quoted text; #quot; is
    # Mermaid's entity for a double quote inside such text.
    ids = {label: f"n{i}" for i, label in enumerate(sorted(labels))}
    lines = ["graph LR"]
    lines += [f'  {ids[label]}["{label.replace(chr(34), "#quot;")}"]'
              for label in ids]
    lines += [f"  {ids[u]} --> {ids[v]}" for u, v in _edges(labels, graph)]
    return "\n".join(lines) + "\n"


_NO_DOT = ("Graphviz 'dot' is not installed; install the Debian package "
           "'graphviz' or use --format dot")


def render_svg(dot_text: str) -> bytes:
    """Render DOT text to SVG with Graphviz; raises QueryError on failure."""
    dot = shutil.which("dot")
    if dot is None:
        raise QueryError(_NO_DOT)
    try:
        proc = subprocess.run([dot, "-Tsvg"], input=dot_text.encode(),
                              capture_output=True, check=False)
    except FileNotFoundError:  # removed between which() and run()
        raise QueryError(_NO_DOT) from None
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip()
        raise QueryError(f"Graphviz 'dot' failed (exit {proc.returncode}): "
                         f"{detail}")
    return proc.stdout


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
