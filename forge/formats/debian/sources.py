"""APT sources: the one reader of a machine's `/etc/apt` source lists, in both formats.

forge never hard-codes a mirror: `debian_rootfs` uses `[debian] mirror` from forge.toml,
or else the archive this machine's own apt sources point at, and the `signed-by` of a
source says which keys apt trusts for it (forge.formats.debian.keyring). Files are read
as apt does (sources.list(5)): `sources.list`, then `sources.list.d/*.list` and
`*.sources` in name order.

* One-line (`*.list`): `type [ options ] URI suite [component ...]`, type `deb` or
  `deb-src`, a `[...]` inside a word keeps its spaces (`cdrom:[Debian 12]/`); options are `key=v1,v2` (also `key+=`, `key-=`), spaces allowed inside the
  brackets; `#` starts a comment, and a commented-out entry (`# deb ...`) is kept as a
  disabled one, as python3-apt and software-properties read it.
* deb822 (`*.sources`): stanzas separated by blank lines, `#` lines are comments, a
  line starting with a space or tab continues the field above (a ` .` line is an empty
  one: an inline armoured key in `Signed-By`). `Types`, `URIs`, `Suites` and
  `Components` hold several whitespace-separated values, each stanza meaning every
  combination; `Enabled: no` disables one.

Options are kept under their deb822 names (one-line `arch` is `Architectures`, `arch+`
is `Architectures-Add`, `signed-by` is `Signed-By`, ...), so both formats read the same.
A malformed entry (no suite, an unclosed `[`) is skipped: apt refuses it as well.
tests/formats/debian/test_sources.py checks all this against python3-apt's own parser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# one-line option -> deb822 field (apt's sourcelist.cc)
_OPTION_FIELDS = {
    "arch": "Architectures", "arch+": "Architectures-Add", "arch-": "Architectures-Remove",
    "lang": "Languages", "lang+": "Languages-Add", "lang-": "Languages-Remove",
    "target": "Targets", "target+": "Targets-Add", "target-": "Targets-Remove",
    "signed-by": "Signed-By", "trusted": "Trusted", "pdiffs": "PDiffs", "by-hash": "By-Hash",
    "check-valid-until": "Check-Valid-Until", "valid-until-min": "Valid-Until-Min",
    "valid-until-max": "Valid-Until-Max", "check-date": "Check-Date",
    "date-max-future": "Date-Max-Future", "inrelease-path": "InRelease-Path",
    "snapshot": "Snapshot", "allow-insecure": "Allow-Insecure", "allow-weak": "Allow-Weak",
    "allow-downgrade-to-insecure": "Allow-Downgrade-To-Insecure",
}
_FIELDS = {f.lower(): f for f in ("Types", "URIs", "Suites", "Components", "Enabled",
                                  *_OPTION_FIELDS.values())}
_LISTS = {"Architectures", "Architectures-Add", "Architectures-Remove", "Languages",
          "Languages-Add", "Languages-Remove", "Targets", "Targets-Add", "Targets-Remove",
          "Signed-By"}
TYPES = ("deb", "deb-src")


@dataclass(frozen=True)
class Source:
    """One enabled `deb` source: a URI with its suites and components."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    # keyring paths, or one embedded armoured key block; empty: apt's default keyrings
    signed_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceEntry:
    """One line of a `.list` file or one stanza of a `.sources` file, as written.

    `options` maps deb822 field names to values: a tuple of strings for list options
    (`Architectures`, `Signed-By`, ...), a string for the others (`Trusted`)."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    options: dict = field(default_factory=dict)
    enabled: bool = True
    where: str = ""  # file:line, for messages

    def sources(self) -> list[Source]:
        if not self.enabled or "deb" not in self.types:
            return []
        signed = tuple(self.options.get("Signed-By", ()))
        return [Source(u, self.suites, self.components, signed) for u in self.uris]


def string_to_bool(value: str, default: bool) -> bool:
    """apt's StringToBool: yes/true/with/on/enable, no/false/without/off/disable, numbers."""
    v = value.strip().lower()
    if v in ("yes", "true", "with", "on", "enable"):
        return True
    if v in ("no", "false", "without", "off", "disable"):
        return False
    return bool(int(v)) if v.isdigit() else default


def _split_list(value: str, name: str, one_line: bool) -> tuple[str, ...]:
    """A list option's values: comma-separated on one line, whitespace-separated in
    deb822 (sources.list(5)), where `Signed-By` takes commas too or one armoured key."""
    if name == "Signed-By" and "BEGIN PGP" in value:
        return (value.strip(),)
    if one_line:
        return tuple(x for x in value.split(",") if x)
    return tuple((value.replace(",", " ") if name == "Signed-By" else value).split())


# ---- one-line ---------------------------------------------------------------------

def parse_one_line(text: str, where: str = "") -> list[SourceEntry]:
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        e = _line_entry(raw, f"{where}:{n}" if where else str(n))
        if e is not None:
            out.append(e)
    return out


def _line_entry(raw: str, where: str) -> SourceEntry | None:
    line, enabled = raw.strip(), True
    if line.startswith("#"):  # perhaps a commented-out entry
        line, enabled = line[1:].strip(), False
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    kind, *rest = line.split(None, 1)
    if kind not in TYPES or not rest:
        return None
    rest, options = rest[0].strip(), {}
    if rest.startswith("["):  # [ key=value key2=v1,v2 ], spaces allowed inside
        inside, sep, rest = rest[1:].partition("]")
        if not sep:
            return None
        for opt in inside.split():
            key, eq, value = opt.partition("=")
            if not eq:
                return None
            name = _OPTION_FIELDS.get(key.lower(), key)
            options[name] = _split_list(value, name, True) if name in _LISTS else value
    words = _words(rest)
    if len(words) < 2:
        return None
    return SourceEntry((kind,), (words[0],), (words[1],), tuple(words[2:]), options, enabled,
                       where)


def _words(text: str) -> list[str]:
    """Whitespace-separated words, `[...]` and `"..."` each kept whole (apt's
    ParseQuoteWord: `cdrom:[Debian GNU/Linux 12]/` is one URI)."""
    out, word, close = [], "", None
    for c in text:
        if close:
            word += c
            close = None if c == close else close
        elif c.isspace():
            if word:
                out.append(word)
            word = ""
        else:
            word += c
            close = {"[": "]", '"': '"'}.get(c)
    return out + [word] * bool(word)


# ---- deb822 -----------------------------------------------------------------------

def parse_deb822(text: str, where: str = "") -> list[SourceEntry]:
    out = []
    stanzas: list[list[tuple[int, str]]] = [[]]
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            continue
        if line.strip():
            stanzas[-1].append((n, line))
        elif stanzas[-1]:
            stanzas.append([])
    for stanza in stanzas:
        if not stanza:
            continue
        fields: dict[str, str] = {}
        key = None
        for _, line in stanza:
            if line[:1] in (" ", "\t"):
                if key is not None:
                    more = line.strip()
                    fields[key] += "\n" + ("" if more == "." else more)
            elif ":" in line:
                k, v = line.split(":", 1)
                key = _FIELDS.get(k.strip().lower(), k.strip())
                fields[key] = v.strip()
        options = {k: (_split_list(v, k, False) if k in _LISTS else v) for k, v in fields.items()
                   if k not in ("Types", "URIs", "Suites", "Components", "Enabled")}
        entry = SourceEntry(tuple(fields.get("Types", "").split()),
                            tuple(fields.get("URIs", "").split()),
                            tuple(fields.get("Suites", "").split()),
                            tuple(fields.get("Components", "").split()), options,
                            string_to_bool(fields.get("Enabled", "yes"), True),
                            f"{where}:{stanza[0][0]}" if where else str(stanza[0][0]))
        if entry.types and entry.uris and entry.suites:
            out.append(entry)
    return out


# ---- a configuration directory ----------------------------------------------------

def read_entries(root: Path = Path("/etc/apt"), *,
                 read: Callable[[Path], bytes] = Path.read_bytes,
                 listdir: Callable[[Path], list[str]] = os.listdir) -> list[SourceEntry]:
    """Every entry of an apt configuration directory, disabled ones included, in apt's
    order. `read` and `listdir` are how files are looked at (a caller may record what
    was read)."""
    out: list[SourceEntry] = []
    try:
        names = sorted(listdir(root / "sources.list.d"))
    except OSError:
        names = []
    for f in [root / "sources.list"] + [root / "sources.list.d" / n for n in names]:
        if f.suffix not in (".sources", ".list") and f.name != "sources.list":
            continue
        try:
            text = read(f).decode("utf-8", "replace")
        except OSError:
            continue
        out += (parse_deb822 if f.suffix == ".sources" else parse_one_line)(text, str(f))
    return out


def read_sources(root: Path = Path("/etc/apt"), *,
                 read: Callable[[Path], bytes] = Path.read_bytes,
                 listdir: Callable[[Path], list[str]] = os.listdir) -> list[Source]:
    """The enabled `deb` sources of an apt configuration directory, one per URI."""
    return [s for e in read_entries(root, read=read, listdir=listdir) for s in e.sources()]


def debian_mirror(sources: list[Source]) -> str | None:
    """The main Debian archive among the sources: it serves a plain suite (no
    `-security`/`-updates` suffix) with the `main` component, from a path ending in
    /debian. Third-party repositories (no such path) are passed over."""
    for s in sources:
        plain = [x for x in s.suites if "-" not in x and "/" not in x]
        if plain and "main" in s.components and s.uri.rstrip("/").endswith("/debian"):
            return s.uri.rstrip("/")
    return None
