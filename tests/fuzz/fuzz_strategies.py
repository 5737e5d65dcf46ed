"""Hypothesis strategies of near-valid inputs, so that the fuzzer gets past the first
check of each parser: real samples with byte mutations, tar archives with hostile names,
links, whiteouts and PAX headers, deb822 stanzas, documents built from the parsers' own
key tables with some values of the wrong type."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

from hypothesis import strategies as st

from fuzzlib import CANARY

# ---- byte mutations of a base input -------------------------------------------------------

_INTERESTING = [b"\0", b"\xff", b"\n", b"/", b"..", b"-1", b"99999999999", b"\"", b"'", b"\\",
                b"${", b"[", b"{", b":", b"\t", b" ", b"#", b"\xc3\x28", b"=", b","]


@st.composite
def mutated(draw, base: st.SearchStrategy[bytes], max_mutations: int = 4) -> bytes:
    """`base` with a few random edits: flips, inserts of tokens that parsers care about,
    deletions, duplications, truncation."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, max_mutations))):
        op = draw(st.integers(0, 5))
        at = draw(st.integers(0, len(data)))
        if op == 0 and data and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == 1:
            data[at:at] = draw(st.sampled_from(_INTERESTING))
        elif op == 2:
            data[at:at + draw(st.integers(1, 16))] = b""
        elif op == 3:
            n = draw(st.integers(1, 32))
            data[at:at] = data[at:at + n]
        elif op == 4:
            del data[at:]
        else:
            data[at:at] = draw(st.binary(max_size=8))
    return bytes(data)


def seeded(seeds: list[bytes], generated: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Generated inputs, real samples, both mutated, and a little plain noise."""
    parts = [generated, mutated(generated)]
    if seeds:
        parts += [st.sampled_from(seeds), mutated(st.sampled_from(seeds), 8)]
    return st.one_of(*parts, st.binary(max_size=64))


def text(s: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    return s.map(lambda t: t.encode("utf-8", "surrogatepass"))


# ---- values for documents driven by a key table -----------------------------------------

WORDS = st.sampled_from(["", "a", "x/y", "../etc", "/abs", "redis:7", "sha256:" + "0" * 64,
                         "linux/amd64", "0755", "100:100", "CAP_NET_ADMIN", "all", "none",
                         "é", "\u202e", "a b", "-", "--", "${X}", "nofile:1:2", "%", "true"])
SCALARS = st.one_of(WORDS, st.integers(-2**70, 2**70), st.booleans(), st.none(),
                    st.floats(allow_nan=True), st.text(max_size=12))
JSONISH = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) |
                       st.dictionaries(WORDS, c, max_size=4), max_leaves=12)


@st.composite
def for_spec(draw, spec, depth: int = 0):
    """A value for a yamlspec-style spec ("str", "strs", "int", {...}, [spec]), or now and
    then a value of another type."""
    if draw(st.integers(0, 9)) == 0 or depth > 3:
        return draw(JSONISH)
    if isinstance(spec, dict):
        keys = draw(st.lists(st.sampled_from(sorted(spec)), max_size=len(spec), unique=True))
        out = {k: draw(for_spec(spec[k], depth + 1)) for k in keys}
        if draw(st.integers(0, 7)) == 0:
            out[draw(WORDS)] = draw(SCALARS)
        return out
    if isinstance(spec, list):
        return draw(st.lists(for_spec(spec[0], depth + 1), max_size=3))
    return draw({"str": WORDS, "strs": st.lists(WORDS, max_size=3), "int": st.integers(-5, 2**33),
                 "bool": st.booleans(), "float": st.floats()}.get(spec, JSONISH))


def json_bytes(s) -> st.SearchStrategy[bytes]:
    return s.map(lambda v: json.dumps(v, default=str).encode())


# ---- tar archives -----------------------------------------------------------------------

NAMES = st.sampled_from([
    "a", "a/b", "d", "d/f", "d/e/f", "./a", "/a", "../x", "a/../../x", "d/../d/f", ".",
    "./", "", "d/.wh.f", "d/.wh..wh..opq", ".wh.d", ".wh..wh..opq", "l", "l/x", "l/../y",
    "lnk", "x" * 120, "d/" + "y" * 150, "é/ü", "a\nb", "dev/console", "etc/passwd",
    "d//f", "d/./f", "h", ".wh...", "d/.wh...", ".wh..", "d/.wh.", ".wh.d/x",
])
LINK_TARGETS = st.sampled_from([
    "a", "d", "d/f", "../x", "../../..", "..", "/", "/etc", "l", "lnk", ".", "",
    str(CANARY), f"{CANARY}/x", "d/../..", "l/..", "/tmp", "x" * 120, "h",
])
_TYPES = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
          tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, b"V", b"x"]
PAX_KEYS = st.sampled_from(["path", "linkpath", "size", "mtime", "uid", "gid", "uname",
                            "SCHILY.xattr.user.k", "SCHILY.xattr.security.capability",
                            "GNU.sparse.map", "GNU.sparse.size", "hdrcharset", "comment"])


@st.composite
def tar_member(draw) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(draw(NAMES))
    ti.type = draw(st.sampled_from(_TYPES))
    if ti.type in (tarfile.SYMTYPE, tarfile.LNKTYPE) or draw(st.integers(0, 9)) == 0:
        ti.linkname = draw(LINK_TARGETS)
    data = draw(st.binary(max_size=300)) if ti.type in (tarfile.REGTYPE, tarfile.CONTTYPE) else b""
    ti.size = len(data)
    ti.mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o000, 0o777, 0o1777, 0o7777]))
    ti.uid, ti.gid = draw(st.sampled_from([0, 1000, 65534, 2**21 - 1])), draw(st.sampled_from([0, 5]))
    ti.mtime = draw(st.sampled_from([0, 1700000000, 2**33 - 1]))
    ti.devmajor, ti.devminor = draw(st.integers(0, 300)), draw(st.integers(0, 300))
    if draw(st.integers(0, 4)) == 0:
        ti.pax_headers = draw(st.dictionaries(PAX_KEYS, st.one_of(
            WORDS, st.sampled_from(["-1", "1e9", "abc", "0,1,2", "99999999999999999999"]),
            LINK_TARGETS), max_size=3))
    return ti, data


@st.composite
def tar_archive(draw, max_members: int = 8) -> bytes:
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in draw(st.lists(tar_member(), max_size=max_members)):
            try:
                tf.addfile(ti, io.BytesIO(data))
            except (ValueError, OverflowError, UnicodeError, tarfile.TarError):
                continue  # a member this format cannot hold
    raw = buf.getvalue()
    if draw(st.integers(0, 5)) == 0:
        raw = gzip.compress(raw, mtime=0)
    return raw


def fix_tar_checksums(data: bytes) -> bytes:
    """Recompute each header's checksum, walking the members by their size fields, so
    that byte mutations of a header reach what is behind tarfile's checksum check."""
    buf = bytearray(data)
    off = 0
    while off + 512 <= len(buf):
        block = buf[off:off + 512]
        if not any(block):
            break
        block[148:156] = b" " * 8
        buf[off + 148:off + 156] = b"%06o\0 " % sum(block)
        try:
            size = int(bytes(block[124:136]).rstrip(b"\0 ").decode() or "0", 8)
        except ValueError:
            break
        off += 512 + -(-max(size, 0) // 512) * 512
    return bytes(buf)
