"""Core rules: filegroup, genrule, http_file, sh_test (Bazel's semantics)."""

from __future__ import annotations

import hashlib
import re
import shutil
from urllib.parse import unquote, urlsplit

from forge.api import ActionFailed, ExecContext, action_function, attr, pool, rule

NETWORK_POOL = pool("network", 4)  # parallel downloads, bounded so a mirror is not flooded

# --- filegroup -------------------------------------------------------------------------


@rule("filegroup", version=1, doc="Names a group of files so other targets can use them together.",
      attrs={"srcs": attr.label_list(doc="The files (or targets whose files) in the group."),
             "data": attr.label_list(doc="Files needed at run time, added to the group.")})
def filegroup(ctx):
    return ctx.info(files=ctx.files("srcs") + ctx.files("data"))


# --- genrule ---------------------------------------------------------------------------

_MAKE_VAR = re.compile(r"\$(\$|@|<|\^|\(([^)]*)\))")


def expand_make_vars(ctx, cmd: str, srcs, outs, locations) -> str:
    """Bazel's genrule substitutions; other `$x` are left to bash."""
    def one(kind, items):
        if len(items) != 1:
            raise ctx.fail(f"'${kind}' needs exactly one {'output' if kind == '@' else 'input'}; "
                           f"this genrule has {len(items)}", attr="cmd",
                           hint="use $(OUTS) or $(SRCS) for several files")
        return items[0].path

    def sub(m):
        tok, var = m.group(1), m.group(2)
        if tok == "$":
            return "$"
        if tok == "@":
            return one("@", outs)
        if tok == "<":
            return one("<", srcs)
        if tok == "^":
            return " ".join(a.path for a in srcs)
        var = var.strip()
        if var == "SRCS":
            return " ".join(a.path for a in srcs)
        if var == "OUTS":
            return " ".join(a.path for a in outs)
        if var in ("RULEDIR", "@D"):
            return ctx.declare("x").path.rsplit("/", 1)[0]
        word, _, arg = var.partition(" ")
        if word in ("location", "locations", "execpath", "execpaths", "rootpath", "rootpaths"):
            files = locations.get(arg.strip())
            if files is None:
                raise ctx.fail(f"$({var}): '{arg.strip()}' is not in srcs, tools or outs of this "
                               "genrule", attr="cmd", hint="add the label to srcs or tools")
            if not word.endswith("s") and len(files) != 1:
                raise ctx.fail(f"$({var}) names {len(files)} files; use $(locations ...)", attr="cmd")
            return " ".join(a.path for a in files)
        raise ctx.fail(f"unknown make variable $({var}) in cmd", attr="cmd",
                       hint="write $$ for a literal '$' (e.g. $$HOME)")
    return _MAKE_VAR.sub(sub, cmd)


@rule("genrule", version=1, doc="Runs a bash command that turns `srcs` into `outs`.", attrs={
    "srcs": attr.label_list(doc="Input files; `$(SRCS)` expands to their paths."),
    "outs": attr.output_list(mandatory=True, doc="Files the command must create; `$(OUTS)`, `$@`."),
    "cmd": attr.string(mandatory=True, doc="The bash command, run in a scratch directory holding "
                       "only the inputs, with `forge-out/`-relative paths."),
    "tools": attr.label_list(doc="Programs the command runs; `$(location //x:tool)` finds them."),
    "executable": attr.bool(default=False, doc="Mark the (single) output executable."),
    "message": attr.string(default="", doc="Progress message shown while it runs."),
})
def genrule(ctx):
    outs = [ctx.declare(o) for o in ctx.attr.outs]
    srcs = ctx.files("srcs")
    tools = ctx.files("tools")
    locations = ctx.location_map(["srcs", "tools"])
    for o_name, art in zip(ctx.attr.outs, outs):
        for text in (o_name, f":{o_name}", f"//{ctx.package}:{o_name}"):
            locations.setdefault(text, [art])
    cmd = expand_make_vars(ctx, ctx.attr.cmd, srcs, outs, locations)
    if ctx.attr.executable and len(outs) != 1:
        raise ctx.fail("executable = True needs exactly one output", attr="executable")
    ctx.run_shell(cmd, inputs=list(dict.fromkeys(srcs + tools)), outputs=outs, mnemonic="Genrule",
                  executable=outs if ctx.attr.executable else (),
                  description=ctx.attr.message or f"Genrule {ctx.label}")
    return ctx.info(files=outs, executable=outs[0] if ctx.attr.executable else None)


# --- http_file -------------------------------------------------------------------------

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@rule("http_file", version=1, doc="Downloads one file and verifies its sha256.", attrs={
    "url": attr.string(default="", doc="Where to download from (http, https or file)."),
    "urls": attr.string_list(doc="Mirrors tried in order."),
    "sha256": attr.string(mandatory=True, doc="The expected sha256, hex."),
    "downloaded_file_path": attr.string(default="", doc="Output file name (default: the URL's last part)."),
    "executable": attr.bool(default=False, doc="Mark the downloaded file executable."),
})
def http_file(ctx):
    urls = ([ctx.attr.url] if ctx.attr.url else []) + list(ctx.attr.urls)
    if not urls:
        raise ctx.fail("http_file needs 'url' or 'urls'", hint='url = "https://example.com/file"')
    sha = ctx.attr.sha256.lower()
    if not _SHA256.match(sha):
        raise ctx.fail(f"sha256 must be 64 hex digits; got {ctx.attr.sha256!r}", attr="sha256")
    name = ctx.attr.downloaded_file_path or urls[0].rstrip("/").rsplit("/", 1)[-1] or "downloaded"
    out = ctx.declare(name)
    ctx.call("HttpFetch", {"urls": urls, "sha256": sha}, inputs=[], outputs=[out],
             mnemonic="HttpFetch", pool="network", origins=[(name, urls[0], f"sha256:{sha}")],
             executable=[out] if ctx.attr.executable else ())
    return ctx.info(files=[out], executable=out if ctx.attr.executable else None)


@action_function("HttpFetch", version=1)
def http_fetch(ctx: ExecContext) -> None:
    from forge.formats.http.client import default_client
    from forge.formats.http.errors import HttpError
    dst = ctx.path(ctx.outputs[0])
    expected = ctx.params["sha256"]
    errors = []
    for url in ctx.params["urls"]:
        with open(dst, "wb") as f:
            sink = _Sha256File(f)
            try:
                if urlsplit(url).scheme == "file":
                    with open(unquote(urlsplit(url).path), "rb") as src:
                        while chunk := src.read(1 << 20):
                            sink.write(chunk)
                else:  # pooled, proxied, retried, resumed after a cut: the digest judges it
                    default_client().download(url, sink)
            except (HttpError, OSError) as e:
                errors.append(str(e) if isinstance(e, HttpError) else f"{url}: {e}")
                continue
        if sink.h.hexdigest() != expected:
            dst.unlink()
            raise ActionFailed(f"sha256 mismatch for {url}: expected {expected}, got {sink.h.hexdigest()}",
                               hint="if the new file is the one you want, update sha256 in the BUILD file")
        return
    dst.unlink(missing_ok=True)
    raise ActionFailed("download failed: " + "; ".join(errors))


class _Sha256File:
    """A download's destination and its sha256 so far; `restart` when it starts over."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.h.update(chunk)
        self.f.write(chunk)

    def restart(self) -> None:
        self.f.seek(0)
        self.f.truncate()
        self.h = hashlib.sha256()


# --- sh_test ---------------------------------------------------------------------------


@rule("sh_test", version=1, test=True, doc="A shell test run by `forge test`; exit 0 passes.", attrs={
    "srcs": attr.label_list(mandatory=True, doc="The test script (exactly one file)."),
    "data": attr.label_list(doc="Files the test reads at run time."),
    "args": attr.string_list(doc="Arguments passed to the script."),
    "env": attr.string_dict(doc="Extra environment variables."),
    "timeout": attr.string(default="moderate", values=("short", "moderate", "long", "eternal"),
                           doc="Bazel's timeout classes: 60 s, 300 s, 900 s, 3600 s."),
    "size": attr.string(default="medium", values=("small", "medium", "large", "enormous"),
                        doc="Accepted for Bazel compatibility."),
})
def sh_test(ctx):
    srcs = ctx.files("srcs")
    if len(srcs) != 1:
        raise ctx.fail(f"sh_test needs exactly one file in srcs; got {len(srcs)}", attr="srcs")
    exe = ctx.declare(ctx.label.name)
    ctx.call("CopyFile", {}, inputs=srcs, outputs=[exe], mnemonic="CopyTest", executable=[exe])
    data = ctx.files("data")
    return ctx.info(files=[exe], executable=exe, runfiles=data, args=list(ctx.attr.args),
                    env=dict(ctx.attr.env),
                    timeout={"short": 60, "moderate": 300, "long": 900, "eternal": 3600}[ctx.attr.timeout])


@action_function("CopyFile", version=1)
def copy_file(ctx: ExecContext) -> None:
    shutil.copyfile(ctx.path(ctx.inputs[0]), ctx.path(ctx.outputs[0]))


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(NETWORK_POOL, filegroup, genrule, http_file, http_fetch, sh_test, copy_file)
