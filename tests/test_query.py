"""Tests for forge.query (the query evaluator) and forge.graphfmt."""

import json
import shutil

import networkx as nx
import pytest

from forge.graphfmt import format_dot, format_json, format_labels, format_mermaid, render_svg
from forge.query import QueryError, evaluate


def make_graph():
    """//app:bin -> //lib:a -> //lib:b -> //lib:b.cc, plus a side genrule.

    //app:bin -> //gen:hdr (genrule) -> //gen:hdr.h (generated file)
    //tools:unused is disconnected.
    """
    g = nx.DiGraph()
    nodes = {
        "//app:bin": ("cc_binary", {"srcs": ["main.cc"], "linkstatic": True}),
        "//lib:a": ("cc_library", {"srcs": ["a.cc"], "hdrs": ["a.h", "util.h"],
                                   "deps": [":b"], "visibility": ["//visibility:public"]}),
        "//lib:b": ("cc_library", {"srcs": ["b.cc"], "copts": [], "testonly": False}),
        "//lib:b.cc": ("source file", {}),
        "//app:main.cc": ("source file", {}),
        "//gen:hdr": ("genrule", {"cmd": "echo hi > $@", "outs": ["hdr.h"],
                                  "env": {"A": "1"}, "shards": 4}),
        "//gen:hdr.h": ("generated file", {}),
        "//tools:unused": ("sh_binary", {}),
    }
    for label, (kind, attrs) in nodes.items():
        g.add_node(label, kind=kind, attrs=attrs)
    g.add_edges_from([
        ("//app:bin", "//lib:a"), ("//app:bin", "//app:main.cc"),
        ("//lib:a", "//lib:b"), ("//lib:b", "//lib:b.cc"),
        ("//app:bin", "//gen:hdr.h"), ("//gen:hdr.h", "//gen:hdr"),
    ])
    return g


def make_resolver(graph):
    calls = []

    def resolve(word):
        calls.append(word)
        if word == "//...":
            return set(graph.nodes)
        if word.endswith("/..."):
            prefix = word[:-len("/...")]
            return {n for n in graph if n.startswith(prefix + ":") or
                    n.startswith(prefix + "/")}
        if word.endswith(":all"):
            pkg = word[:-len(":all")]
            return {n for n in graph if n.split(":")[0] == pkg}
        if word not in graph:
            raise LookupError(f"no such target '{word}'")
        return {word}

    resolve.calls = calls
    return resolve


@pytest.fixture
def q():
    graph = make_graph()
    resolve = make_resolver(graph)

    def run(expr):
        return evaluate(expr, graph, resolve)

    run.graph = graph
    run.resolve = resolve
    return run


def err(q, expr):
    with pytest.raises(QueryError) as info:
        q(expr)
    return str(info.value)


# --- words -----------------------------------------------------------------

def test_plain_word_and_patterns(q):
    assert q("//lib:a") == {"//lib:a"}
    assert q("//lib/...") == {"//lib:a", "//lib:b", "//lib:b.cc"}
    assert q("//gen:all") == {"//gen:hdr", "//gen:hdr.h"}


def test_quoted_words(q):
    assert q("'//lib:a'") == {"//lib:a"}
    assert q('"//lib:a" + \'//lib:b\'') == {"//lib:a", "//lib:b"}


def test_quoted_keyword_and_function_name_are_words(q):
    # Quoting makes 'union' and 'deps' plain words handed to resolve().
    with pytest.raises(LookupError, match="'union'"):
        q("'union'")
    with pytest.raises(LookupError, match="'deps'"):
        q("'deps'")


def test_resolver_errors_propagate(q):
    with pytest.raises(LookupError, match="no such target '//nope:x'"):
        q("deps(//nope:x)")


def test_resolver_returned_set_is_not_mutated():
    graph = make_graph()
    shared = {"//lib:a", "//lib:b"}
    result = evaluate("//lib:a - //lib:b", graph,
                      lambda w: shared if w == "//lib:a" else {"//lib:b"})
    assert result == {"//lib:a"}
    assert shared == {"//lib:a", "//lib:b"}


# --- deps / rdeps ------------------------------------------------------------

def test_deps_unbounded(q):
    assert q("deps(//lib:a)") == {"//lib:a", "//lib:b", "//lib:b.cc"}
    assert q("deps(//app:bin)") == set(q.graph) - {"//tools:unused"}


def test_deps_with_depth(q):
    assert q("deps(//app:bin, 0)") == {"//app:bin"}
    assert q("deps(//app:bin, 1)") == {"//app:bin", "//lib:a", "//app:main.cc",
                                      "//gen:hdr.h"}
    assert q("deps(//app:bin, 2)") == q("deps(//app:bin, 1)") | {"//lib:b", "//gen:hdr"}
    assert q("deps(//app:bin, 99)") == q("deps(//app:bin)")


def test_rdeps_with_universe(q):
    assert q("rdeps(//..., //lib:b)") == {"//lib:b", "//lib:a", "//app:bin"}
    assert q("rdeps(//..., //lib:b, 1)") == {"//lib:b", "//lib:a"}
    assert q("rdeps(//..., //lib:b, 0)") == {"//lib:b"}
    # The universe is the transitive closure of //lib:a, which excludes //app:bin.
    assert q("rdeps(//lib:a, //lib:b.cc)") == {"//lib:a", "//lib:b", "//lib:b.cc"}
    # Targets outside the universe's closure are not reported at all.
    assert q("rdeps(//gen:all, //lib:b)") == set()


# --- filters -----------------------------------------------------------------

def test_kind(q):
    assert q("kind(cc_library, //...)") == {"//lib:a", "//lib:b"}
    assert q("kind('source file', //...)") == {"//lib:b.cc", "//app:main.cc"}
    assert q("kind(generated, //...)") == {"//gen:hdr.h"}
    # "rule" matches every rule target, because kinds are matched as "<kind> rule".
    assert q("kind(rule, //...)") == {"//app:bin", "//lib:a", "//lib:b",
                                      "//gen:hdr", "//tools:unused"}
    assert q("kind('^genrule rule$', //...)") == {"//gen:hdr"}
    assert q("kind(' file$', deps(//app:bin))") == {"//lib:b.cc", "//app:main.cc",
                                                     "//gen:hdr.h"}


def test_attr_on_strings_ints_and_dicts(q):
    assert q("attr(cmd, 'echo', //...)") == {"//gen:hdr"}
    assert q("attr(cmd, '^nope', //...)") == set()
    assert q("attr(shards, '^4$', //...)") == {"//gen:hdr"}
    assert q("attr(env, 'A: 1', //...)") == {"//gen:hdr"}


def test_attr_on_lists(q):
    # Any element matching is enough...
    assert q("attr(hdrs, '^util\\.h$', //...)") == {"//lib:a"}
    assert q("attr(srcs, '\\.cc$', //...)") == {"//app:bin", "//lib:a", "//lib:b"}
    # ...and the Bazel rendering "[a, b]" can be matched as a whole.
    assert q("attr(hdrs, '^\\[a\\.h, util\\.h\\]$', //...)") == {"//lib:a"}
    assert q("attr(copts, '^\\[\\]$', //...)") == {"//lib:b"}


def test_attr_on_booleans(q):
    assert q("attr(linkstatic, 1, //...)") == {"//app:bin"}
    assert q("attr(linkstatic, True, //...)") == {"//app:bin"}
    assert q("attr(testonly, '^0$', //...)") == {"//lib:b"}


def test_filter_and_labels(q):
    assert q("filter('\\.cc$', //...)") == {"//lib:b.cc", "//app:main.cc"}
    assert q("labels(deps, //lib:a)") == {"//lib:b"}
    assert q("labels(srcs, //app:bin + //lib:b)") == {"//app:main.cc", "//lib:b.cc"}
    # Strings that are not targets in the graph are dropped.
    assert q("labels(cmd, //gen:hdr)") == set()


def test_set(q):
    assert q("set(//lib:a //lib:b)") == {"//lib:a", "//lib:b"}
    assert q("set()") == set()


# --- paths -------------------------------------------------------------------

def test_somepath_found(q):
    assert q("somepath(//app:bin, //lib:b.cc)") == {"//app:bin", "//lib:a",
                                                    "//lib:b", "//lib:b.cc"}
    assert q("somepath(//lib:a, //lib:a)") == {"//lib:a"}


def test_somepath_not_found(q):
    assert q("somepath(//lib:b.cc, //app:bin)") == set()
    assert q("somepath(//tools:unused, //...)") == {"//tools:unused"}
    assert q("somepath(//tools:unused, //lib:a)") == set()


def test_somepath_picks_one_of_several_paths():
    g = nx.DiGraph([("//a", "//b1"), ("//a", "//b2"), ("//b1", "//c"), ("//b2", "//c")])
    path = evaluate("somepath(//a, //c)", g, lambda w: {w})
    assert path in ({"//a", "//b1", "//c"}, {"//a", "//b2", "//c"})


def test_allpaths(q):
    g = nx.DiGraph([("//a", "//b1"), ("//a", "//b2"), ("//b1", "//c"), ("//b2", "//c"),
                    ("//b2", "//d"), ("//e", "//c")])
    assert evaluate("allpaths(//a, //c)", g, lambda w: {w}) == {"//a", "//b1", "//b2", "//c"}
    assert evaluate("allpaths(//c, //a)", g, lambda w: {w}) == set()
    assert q("allpaths(//app:bin, //lib:b)") == {"//app:bin", "//lib:a", "//lib:b"}


# --- operators ---------------------------------------------------------------

def test_set_operators_symbols_and_keywords(q):
    both = "//lib:a + //lib:b"
    assert q(both) == q("//lib:a union //lib:b") == {"//lib:a", "//lib:b"}
    assert q("//lib/... - //lib:b.cc") == q("//lib/... except //lib:b.cc") == {"//lib:a", "//lib:b"}
    assert q("deps(//lib:a) ^ //lib:b") == q("deps(//lib:a) intersect //lib:b") == {"//lib:b"}


def test_operators_left_associative_equal_precedence(q):
    # (a + b) - b, not a + (b - b)
    assert q("//lib:a + //lib:b - //lib:b") == {"//lib:a"}
    # (a - b) + b, not a - (b + b)
    assert q("//lib:a - //lib:b + //lib:b") == {"//lib:a", "//lib:b"}
    # (a + b) ^ a: intersect does not bind tighter than union
    assert q("//lib:a + //lib:b ^ //lib:a") == {"//lib:a"}


def test_parentheses_override_associativity(q):
    assert q("//lib:a + (//lib:b - //lib:b)") == {"//lib:a"}
    assert q("//lib:a - (//lib:b + //lib:a)") == set()
    assert q("((//lib:a))") == {"//lib:a"}
    assert q("deps((//lib:b + //gen:hdr.h), 1)") == {"//lib:b", "//lib:b.cc",
                                                       "//gen:hdr.h", "//gen:hdr"}


def test_hyphen_inside_word_is_part_of_the_word():
    g = nx.DiGraph()
    g.add_nodes_from(["//a:x-y", "//a:x", "//a:y"])
    assert evaluate("//a:x-y", g, lambda w: {w}) == {"//a:x-y"}
    assert evaluate("//a:x - //a:x", g, lambda w: {w}) == set()


def test_long_union_chain_does_not_recurse():
    g = nx.DiGraph()
    g.add_nodes_from(f"//p:t{i}" for i in range(5000))
    expr = " + ".join(f"//p:t{i}" for i in range(5000))
    assert len(evaluate(expr, g, lambda w: {w})) == 5000


def test_multiline_query(q):
    assert q("deps(//lib:a)\n  - //lib:b.cc") == {"//lib:a", "//lib:b"}


# --- errors ------------------------------------------------------------------

def test_unknown_function_did_you_mean(q):
    assert err(q, "//lib:a + dep(//lib:b)") == \
        "query:1:11: unknown function 'dep'; did you mean 'deps'?"
    assert err(q, "sompath(//a, //b)") == \
        "query:1:1: unknown function 'sompath'; did you mean 'somepath'?"
    assert err(q, "frobnicate(//a)") == "query:1:1: unknown function 'frobnicate'"


def test_syntax_errors_do_not_call_resolve(q):
    err(q, "deps(//lib:a) + dep(//lib:b)")
    assert q.resolve.calls == []


def test_unbalanced_parentheses(q):
    assert err(q, "deps(//lib:a") == \
        "query:1:5: unbalanced parentheses: '(' is never closed"
    assert err(q, "(//lib:a + //lib:b") == \
        "query:1:1: unbalanced parentheses: '(' is never closed"
    assert err(q, "deps(//lib:a))") == \
        "query:1:14: unbalanced parentheses: unexpected ')'"
    assert err(q, "//lib:a)") == "query:1:8: unbalanced parentheses: unexpected ')'"
    assert err(q, ")") == "query:1:1: unbalanced parentheses: unexpected ')'"


def test_wrong_argument_count(q):
    assert err(q, "deps(//a, 1, 2)") == "query:1:1: deps() takes 1 or 2 arguments but got 3"
    assert err(q, "deps()") == "query:1:1: deps() takes 1 or 2 arguments but got 0"
    assert err(q, "x + rdeps(//a)") == "query:1:5: rdeps() takes 2 or 3 arguments but got 1"
    assert err(q, "kind(rule)") == "query:1:1: kind() takes exactly 2 arguments but got 1"
    assert err(q, "somepath(//a, //b, //c)") == \
        "query:1:1: somepath() takes exactly 2 arguments but got 3"


def test_bad_argument_types(q):
    assert err(q, "deps(//a, x)") == \
        "query:1:11: the depth argument of deps() must be a non-negative integer, got 'x'"
    assert err(q, "deps(//a, -1)") == "query:1:11: expected an expression after ',' but found '-'"
    assert err(q, "kind(deps(//a), //b)") == \
        "query:1:6: argument 1 of kind() must be a word, not an expression"
    assert err(q, "kind('a(', //a)") == \
        "query:1:6: invalid regular expression 'a(': missing ), unterminated " \
        "subpattern at position 1"


def test_other_syntax_errors(q):
    assert err(q, "") == "query:1:1: empty query expression"
    assert err(q, "- //a") == "query:1:1: expected an expression but found '-'"
    assert err(q, "   ") == "query:1:1: empty query expression"
    assert err(q, "//lib:a +") == \
        "query:1:10: expected an expression after '+' but found the end of the query"
    assert err(q, "//lib:a union") == \
        "query:1:14: expected an expression after '+' but found the end of the query"
    assert err(q, "//lib:a //lib:b") == (
        "query:1:9: unexpected '//lib:b'; expected an operator "
        "(+, -, ^, union, except, intersect) or the end of the query")
    assert err(q, "deps(//lib:a //lib:b)") == (
        "query:1:14: unexpected '//lib:b'; expected ',' or ')' or an operator "
        "(+, -, ^, union, except, intersect)")
    assert err(q, "deps(//a, )") == "query:1:11: expected an expression after ',' but found ')'"
    assert err(q, "()") == "query:1:2: expected an expression after '(' but found ')'"
    assert err(q, "deps(//a, ²)") == \
        "query:1:11: the depth argument of deps() must be a non-negative integer, got '²'"
    assert err(q, "//a + 'oops") == "query:1:7: unclosed quotation ': missing the closing '"
    assert err(q, "deps(//a,\n  dep(//b))") == "query:2:3: unknown function 'dep'; did you mean 'deps'?"


# --- output formats ----------------------------------------------------------

def test_format_labels(q):
    assert format_labels({"//lib:b", "//lib:a"}, q.graph) == "//lib:a\n//lib:b\n"
    assert format_labels(set(), q.graph) == ""


def test_format_json(q):
    data = json.loads(format_json({"//lib:b", "//lib:a"}, q.graph))
    assert data == [
        {"label": "//lib:a", "kind": "cc_library", "deps": ["//lib:b"]},
        {"label": "//lib:b", "kind": "cc_library", "deps": ["//lib:b.cc"]},
    ]


def test_format_dot_deterministic(q):
    result = q("deps(//lib:a)")
    text = format_dot(result, q.graph)
    assert text == (
        'digraph forge {\n'
        '  node [shape=box];\n'
        '  "//lib:a";\n'
        '  "//lib:b";\n'
        '  "//lib:b.cc";\n'
        '  "//lib:a" -> "//lib:b";\n'
        '  "//lib:b" -> "//lib:b.cc";\n'
        '}\n')
    # Same result regardless of set construction order.
    assert format_dot(set(sorted(result, reverse=True)), q.graph) == text


def test_format_dot_escapes_quotes():
    g = nx.DiGraph([('//a:"x"', "//a:y")])
    assert '"//a:\\"x\\"" -> "//a:y";' in format_dot(set(g), g)


def test_format_mermaid_deterministic(q):
    text = format_mermaid(q("deps(//lib:a)"), q.graph)
    assert text == (
        'graph LR\n'
        '  n0["//lib:a"]\n'
        '  n1["//lib:b"]\n'
        '  n2["//lib:b.cc"]\n'
        '  n0 --> n1\n'
        '  n1 --> n2\n')
    assert format_mermaid(q("deps(//lib:a)"), q.graph) == text


def test_formats_induced_subgraph_only(q):
    text = format_dot({"//app:bin", "//lib:b"}, q.graph)
    assert "->" not in text


@pytest.mark.skipif(shutil.which("dot") is None,
                    reason="Graphviz 'dot' not installed (apt-get install graphviz)")
def test_render_svg(q):
    svg = render_svg(format_dot(q("deps(//app:bin)"), q.graph))
    assert isinstance(svg, bytes)
    assert svg.startswith(b"<?xml") or b"<svg" in svg


def test_render_svg_without_dot(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(QueryError) as info:
        render_svg("digraph {}")
    assert str(info.value) == ("Graphviz 'dot' is not installed; install the "
                               "Debian package 'graphviz' or use --format dot")


@pytest.mark.skipif(shutil.which("dot") is None,
                    reason="Graphviz 'dot' not installed (apt-get install graphviz)")
def test_render_svg_bad_input():
    with pytest.raises(QueryError, match="Graphviz 'dot' failed"):
        render_svg("this is not dot {{{")


# --- scale -------------------------------------------------------------------

def test_large_graph_chain_and_fan():
    """100k nodes: a 50k chain whose head also fans out to 50k leaves."""
    g = nx.DiGraph()
    chain = [f"//chain:c{i}" for i in range(50_000)]
    nx.add_path(g, chain)
    g.add_edges_from((chain[0], f"//fan:f{i}") for i in range(50_000))
    for n in g:
        g.nodes[n].update(kind="genrule", attrs={})

    def resolve(word):
        return set(g) if word == "//..." else {word}

    assert len(evaluate("deps(//chain:c0)", g, resolve)) == 100_000
    assert len(evaluate("deps(//chain:c0, 2)", g, resolve)) == 50_003
    assert len(evaluate("rdeps(//..., //chain:c49999)", g, resolve)) == 50_000
    assert len(evaluate("somepath(//chain:c0, //chain:c49999)", g, resolve)) == 50_000
    assert len(evaluate("allpaths(//chain:c0, //fan:f7)", g, resolve)) == 2
    assert len(evaluate("kind(rule, deps(//chain:c0)) - //fan:f1", g, resolve)) == 99_999
