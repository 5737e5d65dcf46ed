"""Harnesses for the text formats users write: LinuxKit YAML assemblies, Dockerfiles and
`.dockerignore`; and for what registries send back as text: auth challenges, token
answers and error bodies. Each accepts only its domain's base error."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import yaml
from hypothesis import strategies as st

from fuzz_strategies import JSONISH, for_spec, json_bytes, seeded, text
from fuzzlib import Harness
from targets_engine import _read

from forge.formats.dockerfile.errors import DockerfileError
from forge.formats.linuxkit.errors import AssemblyError
from forge.formats.registry.errors import RegistryError

# ---- LinuxKit assemblies ---------------------------------------------------------------


@functools.cache
def _assembly_spec():
    from forge.formats.linuxkit import assembly as a
    entries = [a.IMAGE_KEYS]
    return {"kernel": a._KERNEL, "init": "strs", "onboot": entries, "onshutdown": entries,
            "services": entries, "files": [a._FILE], "volumes": [a._VOLUME], "trust": "str"}


@st.composite
def assembly_doc(draw) -> bytes:
    doc = draw(for_spec(_assembly_spec()))
    if isinstance(doc, dict):  # names that collide, as users' copy-paste does
        for section in ("onboot", "services"):
            entries = doc.get(section)
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and draw(st.booleans()):
                    entry["name"] = draw(st.sampled_from(["a", "b", "redis"]))
                    entry["image"] = draw(st.sampled_from(["redis:7", "//images/init:init", ""]))
    try:
        return yaml.safe_dump(doc, allow_unicode=True).encode()
    except yaml.YAMLError:
        return json.dumps(doc, default=str).encode()


def run_assembly(data: bytes, tmp: Path) -> None:
    from forge.formats.linuxkit import assembly, runtime
    files = [(f"a{i}.yml", part.decode("utf-8", "replace"))
             for i, part in enumerate(data.split(b"\0\0"))]
    asm = assembly.load(files)
    ids = assembly.allocate_ids(asm)
    assembly.image_refs(asm)
    for entry in asm.entries():
        runtime.runtime_config(entry, {"config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]}}, None, ids)


def _label_spec() -> dict:
    from forge.formats.linuxkit.assembly import IMAGE_KEYS
    return {k: v for k, v in IMAGE_KEYS.items() if k not in ("name", "image")}


def _label_case(data: bytes, tmp: Path) -> None:
    """The `org.mobyproject.config` label comes from an image's config: remote input."""
    from forge.formats.linuxkit import assembly, runtime
    asm = assembly.load([("a.yml", "services:\n  - name: s\n    image: x\n")])
    label = data.decode("utf-8", "replace")
    entry = asm.entries()[0]
    runtime.runtime_config(entry, {"config": {"Labels": {"org.mobyproject.config": label}}},
                           None, assembly.allocate_ids(asm))


# ---- Dockerfiles ------------------------------------------------------------------------

_INSTRUCTIONS = ["FROM", "RUN", "COPY", "ADD", "ARG", "ENV", "WORKDIR", "USER", "CMD",
                 "ENTRYPOINT", "EXPOSE", "LABEL", "HEALTHCHECK", "SHELL", "VOLUME", "STOPSIGNAL",
                 "ONBUILD", "MAINTAINER", "NOSUCH", "# syntax=docker/dockerfile:1", "# escape=`"]
_ARGS = st.sampled_from([
    "debian AS build", "scratch", "${BASE:-debian}", "$X", "build", "--from=build /a /b",
    "--from=0 /out/ /", "--chmod=755 a b", "--chown=1:1 a /", "--link a b",
    "--mount=type=cache,target=/c x",
    '["sh", "-c", "x"]', '["unclosed', "<<EOF\nhello\nEOF", "<<-'E' a\n\tx\nE", "A=1 B=\"2 3\"",
    "A", "A=", "${A:?err}", "${A/x/y}", "${}", "$", "\\", "a \\\n b", "--interval=1s CMD x",
    "NONE", "--platform=$BUILDPLATFORM debian", "http://example.invalid/x.tgz /x", "/a/b/",
    "--keep-git-dir=true git@x:y /z", "'quoted", "\"unterminated", "80/tcp", "SIGTERM",
    "--network=none x", "--security=insecure x", "-", "${A:+x}${B:-${C}}", "`", "x `\n y",
])


@st.composite
def dockerfile_text(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 8))):
        ins = draw(st.sampled_from(_INSTRUCTIONS))
        if ins.startswith("#"):
            lines.append(ins)
            continue
        words = draw(st.lists(_ARGS, min_size=0, max_size=3))
        lines.append((ins if draw(st.integers(0, 5)) else ins.lower()) + " " + " ".join(words))
    return "\n".join(lines) + "\n"


def run_dockerfile(data: bytes, tmp: Path) -> None:
    from forge.formats.dockerfile import parser
    df = parser.parse(data.decode("utf-8", "replace"))
    for target in (None, 0, len(df.stages) - 1):
        parser.needed_stages(df, target)
    resolved = parser.resolve(df, {"A": "1", "BASE": "debian"}, {"BUILDPLATFORM": "linux/amd64"})
    parser.needed_stages(resolved, None)
    for stage in resolved.stages:
        parser.stage_deps(stage)
        parser.external_refs(stage)
        parser.context_sources(stage)
        parser.remote_sources(stage)


_IGNORE_LINES = st.sampled_from(["*", "**", "!a", "a/**/b", "#c", "/x", "../y", "[a-", "[]",
                                 "\\", "a\\", "?", "!", "!!x", "**/*.go", "x/[!a]", "[^", "{a,b}",
                                 " ", "\ufeff*", "a/../..", "//", ".", "./x", "[\\]"])
_PATHS = ["a", "a/b", "x/y/z", "b.go", ".git/config", "Dockerfile", "é", "[", "\\"]


def run_ignore(data: bytes, tmp: Path) -> None:
    from forge.formats.dockerfile.ignore import DockerIgnore
    DockerIgnore(data.decode("utf-8", "replace")).filter(_PATHS)


# ---- registries: challenges, token answers, error bodies ---------------------------------

_CHALLENGES = st.lists(st.sampled_from([
    "Bearer", "Basic", "Digest", 'realm="http://127.0.0.1:1/token"', 'realm="x"', "realm=",
    'service="registry"', 'scope="repository:a:pull"', "scope=a,b", 'a="\\"q\\""', ",", " ",
    "token68==", 'realm="http://[::1', 'realm="http://h/t?x=1"', '"', "=", "error=invalid_token",
]), max_size=8).map(" ".join)


class _TokenServer:
    """Stands in for the HTTP client: the token server's answer is the input's."""

    def __init__(self, status: int, body: bytes):
        self.status, self.body = status, body

    def request(self, method, url, **kw):
        return self


def run_auth(data: bytes, tmp: Path) -> None:
    """An `Authenticator` answering a 401 whose challenge, token answer and docker
    config are the input. The token server is a function returning the input's answer:
    what it parses is the point, not the socket."""
    from forge.formats.registry.auth import Authenticator, parse_www_authenticate
    header, _, rest = data.partition(b"\0")
    body, _, config = rest.partition(b"\0")
    status = 200 if not body or body[0] != ord("!") else 401
    cfg = tmp / "config.json"
    try:  # a credential helper would run a program: keep to the file's own parsing
        doc = json.loads(config)
        if isinstance(doc, dict):
            doc.pop("credHelpers", None), doc.pop("credsStore", None)
            config = json.dumps(doc).encode()
    except ValueError:
        pass
    cfg.write_bytes(config)
    value = header.decode("utf-8", "replace")
    parse_www_authenticate(value)
    auth = Authenticator(docker_config=cfg, http=_TokenServer(status, body), timeout=1)
    auth.authenticate("127.0.0.1:5000", "repository:a:pull", value, None, "manifest a:1")
    sent = auth.authorization("127.0.0.1:5000", "repository:a:pull")
    if not isinstance(sent, str):
        raise AssertionError(f"authorization header {sent!r}")
    sent.encode("latin-1")  # http.client sends headers as latin-1


@st.composite
def auth_input(draw) -> bytes:
    token = draw(st.one_of(json_bytes(st.fixed_dictionaries({}, optional={
        "token": JSONISH, "access_token": JSONISH, "expires_in": JSONISH})), st.binary(max_size=20)))
    config = draw(json_bytes(st.fixed_dictionaries({}, optional={"auths": st.one_of(
        st.dictionaries(st.sampled_from(["127.0.0.1:5000", "https://127.0.0.1:5000/v1/", "x"]),
                        st.one_of(st.fixed_dictionaries({}, optional={
                            "auth": st.sampled_from(["dTpw", "!!", "dQ==", "", "w6k6w6k="]),
                            "username": JSONISH, "password": JSONISH, "identitytoken": JSONISH}),
                            JSONISH), max_size=2), JSONISH)})))
    return draw(text(_CHALLENGES)) + b"\0" + token + b"\0" + config


@functools.cache
def _transport():
    from forge.formats.registry.transport import Transport
    return Transport(retries=0)


def run_error_body(data: bytes, tmp: Path) -> None:
    from forge.formats.registry.transport import Endpoint
    status = 400 + (data[0] % 120 if data else 0)
    what = ["manifest a:1", "manifest a@sha256:0", "blob sha256:0", "upload"][len(data) % 4]
    err = _transport().http_error(Endpoint("127.0.0.1:5000", "http", "127.0.0.1:5000"), status,
                                  "GET", what, data[1:], "repository:a:pull")
    if not isinstance(err, RegistryError) or not str(err):
        raise AssertionError(f"http_error returned {err!r}")


_ERROR_BODY = json_bytes(st.one_of(st.fixed_dictionaries({"errors": st.one_of(
    st.lists(st.fixed_dictionaries({}, optional={"code": st.sampled_from(["NAME_UNKNOWN", "DENIED", 3]),
                                                 "message": JSONISH, "detail": JSONISH}), max_size=3),
    JSONISH)}), JSONISH))

HARNESSES = [
    Harness("linuxkit_yaml", run_assembly, (AssemblyError,),
            seeded(_read("examples/**/*.yml", "tests/formats/linuxkit/assembly_cases/**/*.yml"),
                   assembly_doc()), examples=80, files=False),
    Harness("linuxkit_label", _label_case, (AssemblyError,),
            seeded(_read("tests/formats/linuxkit/assembly_cases/*.json"),
                   st.one_of(json_bytes(for_spec(_label_spec())), assembly_doc())),
            examples=80, files=False),
    Harness("dockerfile", run_dockerfile, (DockerfileError,),
            seeded(_read("examples/**/Dockerfile"), text(dockerfile_text())), files=False),
    Harness("dockerignore", run_ignore, (DockerfileError,),
            seeded([b"*\n!keep\n# c\n**/*.pyc\n"],
                   text(st.lists(_IGNORE_LINES, max_size=6).map("\n".join))), files=False),
    Harness("registry_auth", run_auth, (RegistryError,),
            seeded([b'Bearer realm="http://127.0.0.1:1/token",service="r",scope="repository:a:pull"'
                    b'\0{"token": "abc"}\0{}'], auth_input())),
    Harness("registry_error_body", run_error_body, (),
            seeded([b'\x05{"errors": [{"code": "NAME_UNKNOWN", "message": "no"}]}'],
                   st.tuples(st.binary(min_size=1, max_size=1), _ERROR_BODY).map(b"".join)),
            files=False),
]
