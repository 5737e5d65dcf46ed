"""Evaluator for forge's Bazel-style query language.

Grammar; as in Bazel, the binary operators are left-associative and share
one precedence level, so ``a - b + c`` means ``(a - b) + c``::

    query  := expr EOF
    expr   := term (op term)*
    op     := '+' | 'union' | '-' | 'except' | '^' | 'intersect'
    term   := WORD | '(' expr ')' | 'set' '(' WORD* ')'
            | NAME '(' [arg (',' arg)*] ')'
    arg    := expr | WORD | INTEGER        (which one depends on the function)

A WORD is quoted with ' or " (no escapes; quoting also stops keywords and
function names being special), or is a run of characters other than space
and ``( ) , ' " ^`` that does not start with ``+`` or ``-``. So ``//a:x-y``
is one word and ``//a - //b`` a difference: put spaces around operators.

    deps(x [, depth])       x and all it depends on; depth 0 is x alone
    rdeps(u, x [, depth])   targets in the transitive closure of u that
                            depend on x (x included)
    allpaths(a, b)          every target on some path from a to b
    somepath(a, b)          the targets on one shortest path from a to b
    kind(regex, x)          kind matches; rule kinds are matched as
                            "<kind> rule", like Bazel, so kind(rule, x) works
    attr(name, regex, x)    attribute `name` matches (lists: any element, or
                            Bazel's "[a, b]" rendering; booleans: 0/1)
    filter(regex, x)        label matches
    labels(name, x)         graph targets named by attribute `name` of x
    set(w1 w2 ...)          union of the words

Regexes use ``re.search``, so they are unanchored. The module is pure: it
only reads the graph, and words go through the caller's ``resolve``, whose
exceptions propagate unchanged.
"""

from __future__ import annotations

import difflib
import re
from collections import deque
from typing import Callable, NamedTuple

__all__ = ["QueryError", "evaluate"]


class QueryError(Exception):
    """A malformed query; the message starts with ``query:LINE:COLUMN:``."""


# Argument kinds: "expr" is a nested query, "word" a plain word, "regex" a
# word compiled while parsing (so a bad one fails before resolve() runs),
# "int" a non-negative integer word; "?" marks an optional argument.
_FUNCS: dict[str, tuple[str, ...]] = {
    "deps": ("expr", "int?"),
    "rdeps": ("expr", "expr", "int?"),
    "allpaths": ("expr", "expr"),
    "somepath": ("expr", "expr"),
    "kind": ("regex", "expr"),
    "attr": ("word", "regex", "expr"),
    "filter": ("regex", "expr"),
    "labels": ("word", "expr"),
    "set": (),  # variadic words; parsed specially
}
_KEYWORDS = {"union": "+", "except": "-", "intersect": "^"}
_NON_RULE_KINDS = {"source file", "generated file", "package group"}
_SPECIAL = set("()',\"^")
_OP_NAMES = "an operator (+, -, ^, union, except, intersect)"
_SET_OPS = {"+": set.__ior__, "-": set.__isub__, "^": set.__iand__}


class _Tok(NamedTuple):
    kind: str  # "word", "op", "(", ")", ",", "eof"
    value: str
    pos: int
    quoted: bool = False


def _where(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"query:{line}:{column}"


def _describe(tok: _Tok) -> str:
    return "the end of the query" if tok.kind == "eof" else f"'{tok.value}'"


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "(),+-^":
            toks.append(_Tok("op" if c in "+-^" else c, c, i))
            i += 1
        elif c in "'\"":
            end = text.find(c, i + 1)
            if end < 0:
                raise QueryError(f"{_where(text, i)}: unclosed quotation {c}: "
                                 f"missing the closing {c}")
            toks.append(_Tok("word", text[i + 1:end], i, quoted=True))
            i = end + 1
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in _SPECIAL:
                i += 1
            word = text[start:i]
            toks.append(_Tok("op", _KEYWORDS[word], start) if word in _KEYWORDS
                        else _Tok("word", word, start))
    toks.append(_Tok("eof", "", n))
    return toks


# AST nodes are tuples whose second element is the source position:
#   ("word", pos, text)
#   ("call", pos, name, args)        args already converted to str/int/node
#   ("chain", pos, first, [(op, node), ...])


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0

    def error(self, pos: int, msg: str) -> QueryError:
        return QueryError(f"{_where(self.text, pos)}: {msg}")

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        tok = self.toks[self.i]
        if tok.kind != "eof":
            self.i += 1
        return tok

    def parse(self) -> tuple:
        if self.peek().kind == "eof":
            raise self.error(0, "empty query expression")
        node = self.expr(None)
        tok = self.peek()
        if tok.kind == ")":
            raise self.error(tok.pos, "unbalanced parentheses: unexpected ')'")
        if tok.kind != "eof":
            raise self.error(tok.pos, f"unexpected {_describe(tok)}; expected "
                                      f"{_OP_NAMES} or the end of the query")
        return node

    def expr(self, after: _Tok | None) -> tuple:
        first = self.term(after)
        rest = []
        while self.peek().kind == "op":
            op = self.next()
            rest.append((op.value, self.term(op)))
        # Chains rather than nested binary nodes keep evaluation iterative,
        # so a long "a + b + c + ..." cannot hit the recursion limit.
        return ("chain", first[1], first, rest) if rest else first

    def term(self, after: _Tok | None) -> tuple:
        tok = self.next()
        if tok.kind == "(":
            node = self.expr(tok)
            self.close(tok, self.next(), f"')' or {_OP_NAMES}")
            return node
        if tok.kind == "word":
            if not tok.quoted and self.peek().kind == "(":
                return self.call(tok)
            return ("word", tok.pos, tok.value)
        if tok.kind == ")" and after is None:
            raise self.error(tok.pos, "unbalanced parentheses: unexpected ')'")
        context = f" after '{after.value}'" if after else ""
        raise self.error(tok.pos, f"expected an expression{context} but "
                                  f"found {_describe(tok)}")

    def close(self, opener: _Tok, tok: _Tok, expected: str) -> None:
        if tok.kind == ")":
            return
        if tok.kind == "eof":
            raise self.error(opener.pos,
                             "unbalanced parentheses: '(' is never closed")
        raise self.error(tok.pos, f"unexpected {_describe(tok)}; "
                                  f"expected {expected}")

    def call(self, name_tok: _Tok) -> tuple:
        name, pos = name_tok.value, name_tok.pos
        if name not in _FUNCS:
            close = difflib.get_close_matches(name, _FUNCS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise self.error(pos, f"unknown function '{name}'{hint}")
        opener = self.next()
        if name == "set":
            words = []
            while self.peek().kind == "word":
                words.append(self.next().value)
            self.close(opener, self.next(), "a word or ')' (set() takes "
                                            "only words, separated by spaces)")
            return ("call", pos, name, words)
        args: list[tuple] = []
        if self.peek().kind == ")":
            self.next()
        else:
            tok = opener
            while True:
                args.append(self.expr(tok))
                tok = self.next()
                if tok.kind != ",":
                    self.close(opener, tok, f"',' or ')' or {_OP_NAMES}")
                    break
        return ("call", pos, name, self.convert(name, pos, args))

    def convert(self, name: str, pos: int, args: list[tuple]) -> list:
        spec = _FUNCS[name]
        required = sum(1 for s in spec if not s.endswith("?"))
        if not required <= len(args) <= len(spec):
            want = (f"exactly {required}" if required == len(spec)
                    else f"{required} or {len(spec)}")
            raise self.error(pos, f"{name}() takes {want} arguments "
                                  f"but got {len(args)}")
        out: list = []
        for index, (kind, arg) in enumerate(zip(spec, args)):
            kind = kind.rstrip("?")
            if kind == "expr":
                out.append(arg)
            elif arg[0] != "word":
                raise self.error(arg[1], f"argument {index + 1} of {name}() "
                                         f"must be a word, not an expression")
            elif kind == "int":
                if not (arg[2].isascii() and arg[2].isdigit()):
                    raise self.error(arg[1], f"the depth argument of {name}() "
                                             f"must be a non-negative integer, "
                                             f"got '{arg[2]}'")
                out.append(int(arg[2]))
            elif kind == "regex":
                try:
                    out.append(re.compile(arg[2]))
                except re.error as e:
                    raise self.error(arg[1], f"invalid regular expression "
                                             f"'{arg[2]}': {e}") from None
            else:
                out.append(arg[2])
        return out


def _reach(adj, start, depth: int | None = None, within=None) -> set[str]:
    """Breadth-first closure of `start` over `adj` (graph.succ or graph.pred).

    A hand-rolled BFS rather than nx.descendants so one pass serves many
    start nodes, depth limits, and a restricting universe.
    """
    seen = set(start)
    frontier = [n for n in seen if n in adj]
    level = 0
    while frontier and (depth is None or level < depth):
        nxt = []
        for node in frontier:
            for dep in adj[node]:
                if dep not in seen and (within is None or dep in within):
                    seen.add(dep)
                    nxt.append(dep)
        frontier = nxt
        level += 1
    return seen


def _kind_text(kind: str) -> str:
    rule = kind not in _NON_RULE_KINDS and not kind.endswith(" rule")
    return f"{kind} rule" if rule else kind


def _attr_texts(value) -> list[str]:
    """Every rendering of an attribute value that attr() tries to match."""
    if value is None:
        return [""]
    if isinstance(value, bool):
        # Bazel renders booleans as 0/1; also accept the spelling users write.
        return [str(int(value)), str(value), str(value).lower()]
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
        return items + ["[" + ", ".join(items) + "]"]
    if isinstance(value, dict):
        return ["{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"]
    return [str(value)]


def _absolute(ref: str, owner: str) -> str:
    """Turn a label written inside `owner`'s attributes into a full label."""
    package = owner.split(":", 1)[0]
    if ref.startswith(":"):
        return package + ref
    if not ref.startswith(("//", "@")):
        return f"{package}:{ref}"
    if ":" not in ref.split("//", 1)[-1]:
        return f"{ref}:{ref.rstrip('/').rsplit('/', 1)[-1]}"
    return ref


class _Evaluator:
    def __init__(self, graph, resolve: Callable[[str], set[str]]):
        self.graph = graph
        self.resolve = resolve
        self.cache: dict[str, frozenset[str]] = {}

    def word(self, text: str) -> set[str]:
        if text not in self.cache:
            self.cache[text] = frozenset(self.resolve(text))
        # Always a fresh set: callers mutate results in place.
        return set(self.cache[text])

    def eval(self, node: tuple) -> set[str]:
        tag = node[0]
        if tag == "word":
            return self.word(node[2])
        if tag == "chain":
            result = self.eval(node[2])
            for op, operand in node[3]:
                result = _SET_OPS[op](result, self.eval(operand))
            return result
        return getattr(self, "f_" + node[2])(*node[3])

    def attrs(self, label: str) -> dict:
        node = self.graph.nodes.get(label)
        return (node.get("attrs") or {}) if node is not None else {}

    def f_set(self, *words: str) -> set[str]:
        result: set[str] = set()
        for w in words:
            result |= self.word(w)
        return result

    def f_deps(self, x, depth=None) -> set[str]:
        return _reach(self.graph.succ, self.eval(x), depth)

    def f_rdeps(self, universe, x, depth=None) -> set[str]:
        closure = _reach(self.graph.succ, self.eval(universe))
        return _reach(self.graph.pred, self.eval(x) & closure, depth, closure)

    def f_allpaths(self, a, b) -> set[str]:
        # On a path from a to b exactly when reachable from a and reaching b.
        forward = _reach(self.graph.succ, self.eval(a))
        return _reach(self.graph.pred, self.eval(b) & forward, None, forward)

    def f_somepath(self, a, b) -> set[str]:
        sources, targets = self.eval(a), self.eval(b)
        common = sources & targets
        if common:
            return {min(common)}
        succ = self.graph.succ
        # Sorted so the chosen path does not depend on string hash seeds.
        starts = sorted(n for n in sources if n in succ)
        parent: dict[str, str | None] = dict.fromkeys(starts)
        queue = deque(starts)
        while queue:
            node = queue.popleft()
            for dep in succ[node]:
                if dep in parent:
                    continue
                parent[dep] = node
                if dep in targets:
                    path: set[str] = set()
                    while dep is not None:
                        path.add(dep)
                        dep = parent[dep]
                    return path
                queue.append(dep)
        return set()

    def f_kind(self, pattern, x) -> set[str]:
        nodes = self.graph.nodes
        return {n for n in self.eval(x) if n in nodes and
                pattern.search(_kind_text(nodes[n].get("kind") or ""))}

    def f_filter(self, pattern, x) -> set[str]:
        return {n for n in self.eval(x) if pattern.search(n)}

    def f_attr(self, name, pattern, x) -> set[str]:
        result = set()
        for n in self.eval(x):
            attrs = self.attrs(n)
            if name in attrs and any(pattern.search(t)
                                     for t in _attr_texts(attrs[name])):
                result.add(n)
        return result

    def f_labels(self, name, x) -> set[str]:
        nodes, result = self.graph.nodes, set()
        for n in self.eval(x):
            value = self.attrs(n).get(name)
            refs = [value] if isinstance(value, str) else value
            if not isinstance(refs, (list, tuple)):
                continue
            for ref in refs:
                if isinstance(ref, str):
                    label = _absolute(ref, n)
                    # Non-label strings (e.g. a cmd) become junk labels that
                    # are not in the graph; dropping them keeps results real.
                    if label in nodes:
                        result.add(label)
        return result


def evaluate(expr: str, graph, resolve: Callable[[str], set[str]]) -> set[str]:
    """Evaluate query `expr` against `graph` (edge u -> v: u depends on v).

    The whole expression is parsed and checked before `resolve` is called, so
    syntax errors never wait on target pattern expansion.
    """
    tree = _Parser(expr).parse()
    return _Evaluator(graph, resolve).eval(tree)
