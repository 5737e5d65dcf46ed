"""Output formats for query results.

Every formatter takes the result set of ``forge.query.evaluate`` and the
graph it ran against, and returns text; none of them prints. Output is
sorted by label so it is byte-for-byte stable across runs (Python's set
order depends on the string hash seed).

    format_labels    one label per line
    format_json      [{"label", "kind", "deps"}], deps being all direct deps
    format_dot       Graphviz digraph of the induced subgraph
    format_mermaid   Mermaid "graph LR" flowchart of the induced subgraph
    render_svg       DOT text -> SVG bytes via the Graphviz `dot` binary
"""

from __future__ import annotations

import json
import shutil
import subprocess

from .query import QueryError

__all__ = ["format_labels", "format_json", "format_dot", "format_mermaid", "render_svg"]


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
