"""Lexical layer of the Dockerfile parser: physical lines to logical instruction lines.

What this module owns, following the official reference (docs.docker.com/reference/dockerfile)
and BuildKit's behaviour where the reference is silent:

* Parser directives: `# key=value` lines at the very top (`syntax`, `escape`, `check`).
  The first line that is not a known directive (a comment, an unknown directive, an
  empty line, an instruction) ends the directive block; a directive given twice is an
  error; `escape` must be `\\` or a backtick.
* Line continuation: a line ending in the escape character (trailing blanks allowed)
  continues on the next line. Inside a continued instruction, comment lines and empty
  lines are dropped; leading whitespace of continuation lines is kept.
* Heredocs (RUN, COPY, ADD, and those as ONBUILD triggers): every word of the logical
  line that looks like `<<NAME`, `<<-NAME` or `<<"NAME"` opens a body read from the
  following lines, in order, up to a line equal to NAME (`<<-` also ignores leading tabs
  on the body and on the terminator). Quoting the name disables expansion.
* The shell-lexer subset Docker uses for variable substitution (`substitute`), the
  quote-aware word splitting it uses for ARG/ENV/LABEL, the leading `--flags` of an
  instruction with the table of flags each instruction takes, and the JSON (exec) form.

Positions are 1-based (line, column) everywhere; columns on continuation lines point at
the physical line the text came from.
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Mapping
from forge.formats.dockerfile.errors import DockerfileError, SubstitutionError

KNOWN_DIRECTIVES = ("syntax", "escape", "check")
_DIRECTIVE = re.compile(r"^\s*#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_HEREDOC = re.compile(r"^(\d*)<<(-?)([^<]*)$")
_HEREDOC_CMDS = ("RUN", "COPY", "ADD")
_SPECIAL_PARAMS = "@*#?-$!0"


# ---------------------------------------------------------------------------------------
# Variable substitution (BuildKit's shell lexer, ProcessWord)

def substitute(word: str, env: Mapping[str, str], escape: str = "\\", *, quotes: bool = True,
               used: set[str] | None = None, skip_unset: bool = False) -> str:
    """Expand `$var`, `${var}`, `${var:-w}`, `${var-w}`, `${var:+w}`, `${var+w}`,
    `${var:?msg}`, `${var?msg}` in `word` and remove quoting, as Docker does.

    Single quotes are literal; inside double quotes the escape character only escapes
    `"`, `$` and itself. An unset variable expands to "". With `quotes=False` (heredoc
    bodies) quote characters are ordinary text and the escape character only protects
    `$` and itself. Every variable name looked up is added to `used`.
    """
    return _Word(word, env, escape, quotes, used, skip_unset).run()


class _Word:
    def __init__(self, s, env, escape, quotes, used, skip_unset):
        self.s, self.i, self.env, self.esc = s, 0, env, escape
        self.quotes, self.used, self.skip_unset = quotes, used, skip_unset

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def next(self) -> str:
        ch = self.peek()
        self.i += bool(ch)
        return ch

    def run(self) -> str:
        return self.until("")

    def until(self, stop: str) -> str:
        out: list[str] = []
        while (ch := self.peek()) != "":
            if stop and ch == stop:
                self.next()
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
            elif self.quotes and ch == "'":
                out.append(self.single())
            elif self.quotes and ch == '"':
                out.append(self.double())
            else:
                self.next()
                if ch == self.esc:
                    if not self.quotes and self.peek() not in ("$", self.esc):
                        out.append(ch)
                        continue
                    ch = self.next()
                out.append(ch)
        if stop:
            raise SubstitutionError(f"unexpected end of statement while looking for matching {stop}")
        return "".join(out)

    def single(self) -> str:
        self.next()
        end = self.s.find("'", self.i)
        if end < 0:
            raise SubstitutionError("unexpected end of statement while looking for matching single-quote")
        text, self.i = self.s[self.i:end], end + 1
        return text

    def double(self) -> str:
        self.next()
        out: list[str] = []
        while True:
            ch = self.peek()
            if ch == "":
                raise SubstitutionError(
                    "unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                self.next()
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            self.next()
            if ch == self.esc and self.peek() in ('"', "$", self.esc) and self.peek():
                ch = self.next()
            out.append(ch)

    def lookup(self, name: str) -> str | None:
        if self.used is not None:
            self.used.add(name)
        return self.env.get(name)

    def name(self) -> str:
        start = self.i
        if self.peek().isdigit():
            while self.peek().isdigit():
                self.next()
            return self.s[start:self.i]
        if self.peek() and self.peek() in _SPECIAL_PARAMS:
            return self.next()
        while (ch := self.peek()) and (ch.isalnum() or ch == "_"):
            self.next()
        return self.s[start:self.i]

    def dollar(self) -> str:
        self.next()
        if self.peek() != "{":
            name = self.name()
            if not name:
                return "$"
            value = self.lookup(name)
            if value is None and self.skip_unset:
                return "$" + name
            return value or ""
        self.next()
        if self.peek() == "":
            raise SubstitutionError("syntax error: missing '}'")
        if self.peek() in "{}:":
            raise SubstitutionError("syntax error: bad substitution")
        name = self.name()
        op = self.next()
        if op == "}":
            value = self.lookup(name)
            if value is None and self.skip_unset:
                return "${" + name + "}"
            return value or ""
        if op == "":
            raise SubstitutionError("syntax error: missing '}'")
        colon = op == ":"
        if colon:
            op = self.next()
        if op not in ("-", "+", "?"):
            raise SubstitutionError(f"unsupported modifier ({':' if colon else ''}{op}) in substitution")
        try:
            word = self.until("}")
        except SubstitutionError:
            raise SubstitutionError("syntax error: missing '}'") from None
        value = self.lookup(name)
        is_set = value is not None and not (colon and value == "")
        if op == "-":
            return value if is_set else word
        if op == "+":
            return word if is_set else ""
        if not is_set:
            raise SubstitutionError(f"{name}: {word or 'is not allowed to be unset'}")
        return value


# ---------------------------------------------------------------------------------------
# Word splitting

def split_words(text: str, escape: str) -> list[tuple[str, int]]:
    """Split on blanks outside quotes, keeping quotes and escapes (BuildKit's parseWords).

    Returns (word, offset) pairs; the offset is where the word starts in `text`.
    """
    words: list[tuple[str, int]] = []
    word, start, quote, blank_ok, i = "", -1, "", False, 0
    while i < len(text):
        ch = text[i]
        if start < 0:
            if ch.isspace():
                i += 1
                continue
            start = i
        if not quote and ch.isspace():
            if blank_ok or word:
                words.append((word, start))
            word, start, blank_ok = "", -1, False
        elif ch == escape and quote != "'":
            if i + 1 < len(text):
                word += ch + text[i + 1]
                i += 1
            elif quote:
                quote = ""
        else:
            if quote and ch == quote:
                quote = ""
            elif not quote and ch in "'\"":
                quote, blank_ok = ch, True
            word += ch
        i += 1
    if start >= 0 and (blank_ok or word):
        words.append((word, start))
    return words


def extract_flags(text: str) -> tuple[list[tuple[str, int]], int]:
    """Leading `--flag[=value]` words of an instruction (quotes removed; `--` ends them).

    Returns the flag words with their offsets, and the offset where the arguments start.
    """
    flags: list[tuple[str, int]] = []
    i = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if not text.startswith("--", i):
            return flags, i
        start, word, quote = i, "", ""
        while i < len(text) and (quote or not text[i].isspace()):
            ch = text[i]
            if ch == quote:
                quote = ""
            elif not quote and ch in "'\"":
                quote = ch
            elif ch == "\\" and i + 1 < len(text):
                i += 1
                word += text[i]
            else:
                word += ch
            i += 1
        if word == "--":
            while i < len(text) and text[i].isspace():
                i += 1
            return flags, i
        flags.append((word, start))


# ---------------------------------------------------------------------------------------
# Flags and the exec (JSON) form

# Flag kinds: str (once), list (repeatable), bool, or a tuple of allowed values.
DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$|^0$")
FLAGS: dict[str, dict[str, object]] = {
    "FROM": {"platform": str},
    "COPY": {"from": str, "chown": str, "chmod": str, "link": bool, "parents": bool,
             "exclude": list},
    "ADD": {"chown": str, "chmod": str, "link": bool, "keep-git-dir": bool, "checksum": str,
            "exclude": list, "unpack": bool},
    "RUN": {"mount": list, "network": ("default", "none", "host"), "security": ("sandbox", "insecure")},
    "HEALTHCHECK": {"interval": str, "timeout": str, "start-period": str, "start-interval": str,
                    "retries": str},
}


def parse_flags(cmd: str, words: list[tuple[str, int]], fail) -> dict[str, str | list[str]]:
    """Check `--name[=value]` words against FLAGS[cmd]; `fail(message, offset)` raises."""
    spec = FLAGS.get(cmd, {})
    out: dict[str, str | list[str]] = {}
    for word, offset in words:
        name, eq, value = word[2:].partition("=")
        kind = spec.get(name)
        if kind is None:
            close = difflib.get_close_matches(name, list(spec), 1, 0.6)
            hint = (f"; did you mean --{close[0]}?" if close else
                    f"; {cmd} takes " + ", ".join("--" + k for k in spec) if spec else
                    f"; {cmd} takes no flags")
            fail(f"unknown flag --{name} for {cmd}{hint}", offset)
        if kind is bool:
            value = value if eq else "true"
            if value not in ("true", "false"):
                fail(f"--{name} expects true or false, got '{value}'", offset)
        elif not eq:
            fail(f"--{name} needs a value: --{name}=<value>", offset)
        elif isinstance(kind, tuple) and value not in kind:
            fail(f"--{name} must be one of {', '.join(kind)}; got '{value}'", offset)
        if kind is list:
            out.setdefault(name, []).append(value)
        elif name in out:
            fail(f"--{name} given twice", offset)
        else:
            out[name] = value
    return out


def json_form(rest: str, fail) -> list[str] | None:
    """The exec (JSON) form, or None for shell form: invalid JSON is shell form, as in
    Docker, but a valid JSON list of non-strings is an error."""
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except ValueError:
        return None
    if not isinstance(value, list):
        return None
    if not all(isinstance(v, str) for v in value):
        fail("when using JSON array syntax, arrays must be comprised of strings only")
    return value


def mount_options(spec: str) -> dict[str, str]:
    """A RUN --mount value (`type=cache,target=/x,from=build`) as a dict; bare keys map to
    "true". `type` defaults to "bind"."""
    fields = next(csv.reader([spec]), [])
    out = {"type": "bind"}
    for f in fields:
        key, eq, value = f.partition("=")
        out[key.strip().lower()] = value if eq else "true"
    return out


# ---------------------------------------------------------------------------------------
# Physical lines to logical lines

@dataclass
class RawHeredoc:
    name: str
    content: str
    expand: bool
    chomp: bool
    col: int


@dataclass
class LogicalLine:
    """One instruction's text with continuations joined, and where each piece came from."""

    text: str
    line: int
    end_line: int
    original: str
    pieces: list[tuple[int, int, int]]  # (offset in text, physical line, column)
    heredocs: list[RawHeredoc] = field(default_factory=list)

    def pos(self, offset: int) -> tuple[int, int]:
        """The (line, column) of character `offset` of `text`."""
        best = self.pieces[0]
        for piece in self.pieces:
            if piece[0] <= offset:
                best = piece
        return best[1], best[2] + max(0, offset - best[0])


def heredoc_words(text: str) -> list[tuple[str, bool, bool, int]]:
    """(name, chomp, expand, offset) for each heredoc opener among the words of `text`."""
    found = []
    for word, offset in split_words(text, "\\"):
        m = _HEREDOC.match(word)
        if not m or not m[3]:
            continue
        try:
            name = substitute(m[3], {}, "\\", skip_unset=True)
        except SubstitutionError:
            continue
        if not name or len(name.split()) != 1:
            continue
        quotes = sum(m[3].count(q) for q in "'\"") - sum(name.count(q) for q in "'\"")
        found.append((name, m[2] == "-", quotes == 0, offset))
    return found


def _can_hold_heredoc(text: str) -> bool:
    words = text.split(None, 2)
    if words and words[0].upper() == "ONBUILD":
        words = words[1:]
    return bool(words) and words[0].upper() in _HEREDOC_CMDS and "<<" in text


def read(text: str, filename: str = "Dockerfile") -> tuple[dict[str, str], str, list[LogicalLine]]:
    """Split a Dockerfile into (directives, escape character, logical lines)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    directives: dict[str, str] = {}
    i = 0
    while i < len(lines) and (m := _DIRECTIVE.match(lines[i])) and m[1].lower() in KNOWN_DIRECTIVES:
        key = m[1].lower()
        if key in directives:
            raise DockerfileError(f"only one {key} parser directive can be used", i + 1, 1, filename)
        directives[key] = m[2]
        i += 1
    escape = directives.get("escape", "\\")
    if escape not in ("\\", "`"):
        raise DockerfileError(f"invalid escape token '{escape}': must be \\ or `", 1, 1, filename)
    cont = re.compile(re.escape(escape) + r"[ \t]*$")

    def trim(s: str) -> tuple[str, bool]:
        m = cont.search(s)
        return (s[:m.start()], True) if m else (s, False)

    out: list[LogicalLine] = []
    while i < len(lines):
        raw = lines[i]
        i += 1
        start = i
        body = raw.lstrip()
        if not body or body.startswith("#"):
            continue
        joined, more = trim(body)
        pieces = [(0, start, len(raw) - len(body) + 1)]
        end = start
        while more and i < len(lines):
            raw = lines[i]
            i += 1
            end = i
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            piece, more = trim(raw)
            pieces.append((len(joined), i, 1))
            joined += piece
        ll = LogicalLine(joined, start, end, "", pieces)
        if _can_hold_heredoc(joined):
            for name, chomp, expand, offset in heredoc_words(joined):
                body_lines, done = [], False
                while i < len(lines):
                    raw = lines[i]
                    i += 1
                    ll.end_line = i
                    if (raw.lstrip("\t") if chomp else raw) == name:
                        done = True
                        break
                    body_lines.append((raw.lstrip("\t") if chomp else raw) + "\n")
                line, col = ll.pos(offset)
                if not done:
                    raise DockerfileError(
                        f"unterminated heredoc '{name}': no line '{name}' before the end of the file",
                        line, col, filename)
                ll.heredocs.append(RawHeredoc(name, "".join(body_lines), expand, chomp, col))
        ll.original = "\n".join(lines[start - 1:ll.end_line])
        out.append(ll)
    return directives, escape, out
