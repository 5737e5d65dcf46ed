"""Talking to a Docker engine: only for Dockerfile stages that RUN commands, and for
`forge run`/`forge load` of images. Images travel as OCI layouts in forge's cache;
the engine receives one only when it lacks it, and results come back normalised
(fixed times, no engine-specific metadata), so nothing is ever keyed on a Docker ID.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from forge.api import ActionFailed, RunContext, UsageError, runner
from forge.formats.image.archive import export_docker_archive
from forge.formats.image.errors import LayoutError
from forge.formats.image.layout import read_image
from forge.formats.image.spec import host_arch

LOCAL_REPO = "forge.local/image"  # engine-side tag of images forge loaded: <repo>:<config hex>


def client():
    try:
        import docker
        c = docker.from_env(timeout=600)
        c.ping()
        return c
    except Exception as e:  # docker raises several unrelated types when no engine answers
        raise ActionFailed(f"no Docker engine answers ({e.__class__.__name__}: {e})",
                           hint="start dockerd (see README: the setup command starts it) or "
                           "set DOCKER_HOST") from None


ENGINE_BACK = ("start dockerd again (or check DOCKER_HOST), then build again: the stages "
               "that finished are cached and are not redone")


def _lost(e: BaseException) -> bool:
    """Whether `e` says the engine went away (killed, restarted), not that it refused."""
    import docker.errors
    if isinstance(e, docker.errors.APIError):
        return False  # it answered
    # the Docker SDK's own transport (requests over urllib3) lets its errors through as they are
    wire = type(e).__module__.split(".")[0] in ("requests", "urllib3")
    return wire or isinstance(e, (docker.errors.DockerException, ConnectionError))


def _killed(msg: str) -> bool:
    return bool(re.search(r"non-zero code: (137|143)\b", msg))  # SIGKILL, SIGTERM


def _answers(c, seconds: float = 5.0) -> bool:
    """Whether the engine keeps answering: one shutting down still does for a while,
    after it has killed the containers."""
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            c.ping()
        except Exception:
            return False
        time.sleep(0.25)
    return True


@contextlib.contextmanager
def engine_lost(doing: str):
    """An engine that stops answering while forge uses it is a build failure naming what
    forge was doing, not a bug."""
    try:
        yield
    except Exception as e:
        if not _lost(e):
            raise
        raise ActionFailed(f"{doing}: the Docker engine stopped answering ({type(e).__name__})",
                           hint=ENGINE_BACK) from None


def ensure_loaded(c, layout: Path) -> str:
    """The engine-side reference of the image in `layout`, loading it if missing."""
    try:
        img = read_image(layout, None)  # forge hands the engine one architecture's layout
    except LayoutError:  # several: the one this machine runs
        img = read_image(layout, f"linux/{host_arch()}")
    platform = f"{img.config.get('os', 'linux')}/{img.config.get('architecture', 'amd64')}"
    config_digest = img.manifest["config"]["digest"]
    tag = f"{LOCAL_REPO}:{config_digest.split(':', 1)[1][:32]}"
    with engine_lost(f"loading the image {config_digest} into the engine"):
        try:
            c.images.get(config_digest)
            c.api.tag(config_digest, tag)
            return tag
        except Exception as e:
            if _lost(e):
                raise
        with tempfile.TemporaryFile() as buf:  # streamed: a base image need not fit in memory
            export_docker_archive(layout, buf, [tag], platform=platform)
            buf.seek(0)
            c.images.load(buf)
    return tag


def build(c, context: Path, dockerfile: str, buildargs: dict[str, str],
          step_lines: list[int], filename: str, platform: str | None = None,
          network: str | None = None) -> str:
    """Run a (rewritten, single-stage) Dockerfile on the engine; returns the image ID.
    `step_lines[i]` is the line in the user's Dockerfile of the i-th instruction, so
    an error names the instruction the user wrote."""
    (context / ".forge.Dockerfile").write_text(dockerfile)
    step = 0
    log: list[str] = []
    image_id = None
    lines = dockerfile.splitlines()

    def at() -> tuple[str, str]:  # "Dockerfile:7: RUN", the instruction
        instr = lines[step] if step < len(lines) else ""
        line = step_lines[step] if step < len(step_lines) else 0
        return f"{filename}:{line}: {instr.split(' ', 1)[0]}", instr

    try:
        for ev in c.api.build(path=str(context), dockerfile=".forge.Dockerfile", buildargs=buildargs,
                              rm=True, forcerm=True, decode=True, pull=False,
                              # the engine's layer cache ignores the network mode: a step
                              # run without network must not be reused for one with it
                              nocache=network is not None, network_mode=network,
                              **({"platform": platform} if platform else {})):
            if "stream" in ev:
                text = ev["stream"]
                log.append(text)
                m = re.match(r"Step (\d+)/\d+ : (.*)", text)
                if m:
                    step = int(m.group(1)) - 1
            if "aux" in ev and "ID" in ev["aux"]:
                image_id = ev["aux"]["ID"]
            if "error" in ev or "errorDetail" in ev:
                msg = ev.get("error") or ev["errorDetail"].get("message", "")
                where, instr = at()
                if _killed(msg) and not _answers(c):  # the engine stopping killed it: not its fault
                    raise ActionFailed(f"{where} stopped: the Docker engine stopped during this "
                                       f"step ({msg.strip()})\n  {instr}", hint=ENGINE_BACK)
                tail = "".join(log[-25:]).rstrip()
                raise ActionFailed(f"{where} failed: {msg.strip()}\n"
                                   f"  {instr}\nengine output (last lines):\n{tail}")
    except Exception as e:
        if not _lost(e):
            raise
        where, instr = at()
        raise ActionFailed(f"{where} stopped: the Docker engine stopped answering "
                           f"({type(e).__name__})\n  {instr}", hint=ENGINE_BACK) from None
    if image_id is None:
        raise ActionFailed("the Docker engine finished the build without an image ID")
    return image_id


def save(c, image_id: str, dest: Path) -> None:
    """Write the engine's `docker save` archive of `image_id` to `dest`."""
    with engine_lost(f"saving the image {image_id} from the engine"), open(dest, "wb") as f:
        for chunk in c.images.get(image_id).save(named=False):
            f.write(chunk)


def local_layers(c, image_id: str) -> tuple[bytes, list[Path]] | None:
    """(config bytes, each layer's overlay directory, bottom to top) of `image_id` when the
    engine keeps its layers in overlay2 on this machine and forge may read them: its
    layers are then read in place instead of through `docker save`, which would stream
    the whole base image too. None otherwise (a remote engine, another storage driver, no
    permission), or when `FORGE_ENGINE_EXPORT=save` asks for the engine's own export."""
    if os.environ.get("FORGE_ENGINE_EXPORT") == "save":
        return None
    with engine_lost(f"inspecting the image {image_id}"):
        info = c.api.inspect_image(image_id)
        root = c.info().get("DockerRootDir") or "/var/lib/docker"
    driver = info.get("GraphDriver") or {}
    data = driver.get("Data") or {}
    if driver.get("Name") != "overlay2" or not data.get("UpperDir"):
        return None
    dirs = [Path(d) for d in [data["UpperDir"]] + (data.get("LowerDir") or "").split(":") if d]
    hexid = image_id.split(":", 1)[-1]
    try:
        config = (Path(root) / "image/overlay2/imagedb/content/sha256" / hexid).read_bytes()
        if not all(os.access(d, os.R_OK | os.X_OK) and d.is_dir() for d in dirs):
            return None
    except OSError:
        return None
    # the engine names the image by its config's digest: what was read is that config
    if hashlib.sha256(config).hexdigest() != hexid or \
            len(json.loads(config).get("rootfs", {}).get("diff_ids", [])) != len(dirs):
        return None
    return config, dirs[::-1]


def remove(c, image_id: str) -> None:
    try:
        c.images.remove(image_id, force=True, noprune=False)
    except Exception:
        pass  # a leftover image costs disk, not correctness


@runner("DockerLoad")
def load_runner(ctx: RunContext) -> int:
    tag = (ctx.args[0] if ctx.args else None) or ctx.params.get("tag")
    if not tag:
        raise UsageError("forge load needs a tag for this image (it has no name of its own)",
                         hint="forge load TARGET repo/name:tag")
    c = client()
    ref = ensure_loaded(c, ctx.root / ctx.params["layout"])
    repo, _, t = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "latest")
    c.api.tag(ref, repo, t)
    print(f"forge: loaded as {repo}:{t}", file=sys.stderr)
    return 0


@runner("DockerRun")
def run_runner(ctx: RunContext) -> int:
    c = client()
    ref = ensure_loaded(c, ctx.root / ctx.params["layout"])
    argv = ["docker", "run", "--rm", "-i"] + (["-t"] if sys.stdin.isatty() else []) + [ref]
    return subprocess.call(argv + list(ctx.args))


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(load_runner, run_runner)
