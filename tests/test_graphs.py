"""Tests for forge.graphs: finding a dependency cycle in the target graph."""

import networkx as nx

from forge.graphs import find_cycle_path


def test_cycle_found_in_scc():
    g = nx.DiGraph([("//app:bin", "//a:x"), ("//a:x", "//b:y"), ("//b:y", "//a:x"),
                    ("//b:y", "//c:z")])
    assert find_cycle_path(g) == ["//a:x", "//b:y", "//a:x"]


def test_cycle_is_a_real_shortest_cycle_in_larger_scc():
    g = nx.DiGraph([("//p:1", "//p:2"), ("//p:2", "//p:3"), ("//p:3", "//p:4"),
                    ("//p:4", "//p:1"), ("//p:3", "//p:1")])
    cycle = find_cycle_path(g)
    assert cycle == ["//p:1", "//p:2", "//p:3", "//p:1"]
    assert all(g.has_edge(u, v) for u, v in zip(cycle, cycle[1:]))


def test_self_loop_cycle():
    g = nx.DiGraph([("//a:x", "//b:y"), ("//b:y", "//b:y")])
    assert find_cycle_path(g) == ["//b:y", "//b:y"]


def test_acyclic_returns_none():
    assert find_cycle_path(nx.DiGraph([("//app:bin", "//lib:a"), ("//lib:a", "//lib:b")])) is None
    assert find_cycle_path(nx.DiGraph()) is None


def test_cycle_search_on_large_graph():
    g = nx.DiGraph()
    nx.add_path(g, [f"//c:{i}" for i in range(100_000)])
    assert find_cycle_path(g) is None
    g.add_edge("//c:99999", "//c:99990")
    cycle = find_cycle_path(g)
    assert cycle[0] == cycle[-1] and len(cycle) == 11
