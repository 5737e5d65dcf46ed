"""Running one Dockerfile stage: `AssembleStage` in Python (no RUN: config changes and
COPY layers, no daemon) or `DockerStage` on the Docker engine (stages with RUN).

Both start from the parent's OCI layout, keep its layer blobs as they are (same
digests), and add normalised layers: entries sorted, every time SOURCE_DATE_EPOCH,
gzip without name or time. Configs carry no creation time or engine metadata.
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path

from forge.api import ActionFailed, ExecContext, action_function
from forge.formats.common.treepath import UnsafePathError, resolve_on_disk
from forge.formats.image.errors import UnsafeLayerError
from forge.formats.image.layer_read import apply_layers, safe_extract
from forge.formats.image.layer_write import layer_from_dir, layer_from_overlay_diff, normalise
from forge.formats.image.archive import import_archive
from forge.formats.image.layout import add_blob, image_config_defaults, read_image, write_image

from . import compressors, dockerengine

# What an image config's `config` may hold; an engine adds more (Hostname, Image...)
# that would make identical stages differ.
CONFIG_KEYS = ("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir",
               "Labels", "StopSignal", "Shell", "Healthcheck", "OnBuild", "ArgsEscaped")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def step_params(step) -> dict:
    ins = step.instruction
    return {"cmd": ins.cmd, "flags": dict(ins.flags), "args": list(ins.args),
            "json": ins.json_form, "line": ins.line, "original": ins.original,
            "heredocs": [[h.name, h.content, h.expand, h.chomp] for h in ins.heredocs],
            "env": dict(step.env)}


def _context_file(p, f: str) -> str:
    """Where build-context file `f` is: below the context prefix, or (a LinuxKit package's
    extra sources) where `sources` says."""
    return p.get("sources", {}).get(f) or p["context_prefix"] + f


def _fail(p, step, message: str) -> ActionFailed:
    return ActionFailed(f"{p['dockerfile']}:{step['line']}: {step['cmd']}: {message}")


# --- the parent image --------------------------------------------------------------------

def _start(ctx: ExecContext, out: Path):
    """(config, layer descriptors) of the parent, its blobs linked into `out`."""
    p = ctx.params
    if not p["base"]["path"]:
        return image_config_defaults(platform=p["platform"]), []
    img = read_image(ctx.path(p["base"]["path"]), p["platform"])
    config = copy.deepcopy(img.config)
    descs = []
    for desc, blob in img.layers:
        add_blob(out, blob, desc["mediaType"])
        descs.append({k: desc[k] for k in ("mediaType", "digest", "size")})
    return config, descs


def _finish(out: Path, config: dict, descs: list[dict], history: list[dict]) -> None:
    config.pop("created", None)
    for k in ("container", "container_config", "docker_version"):
        config.pop(k, None)
    inner = config.get("config") or {}
    config["config"] = {k: inner[k] for k in CONFIG_KEYS if inner.get(k) not in (None, [], {})}
    config["history"] = [{k: v for k, v in h.items() if k != "created"} for h in history]
    write_image(out, config, descs,
                    platform=(config.get("os", "linux"), config.get("architecture", "amd64")))


# --- AssembleStage ---------------------------------------------------------------------

@action_function("AssembleStage", version=2)
def assemble_stage(ctx: ExecContext) -> None:
    p = ctx.params
    out = ctx.path(ctx.outputs[0])
    config, descs = _start(ctx, out)
    history = list(config.get("history", []))
    cfg = config.setdefault("config", {}) or {}
    config["config"] = cfg
    diff_ids = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})["diff_ids"]
    cmd_set_here = False
    for n, st in enumerate(p["steps"]):
        c, args = st["cmd"], st["args"]
        empty = True
        if c == "ENV":
            env = dict(e.split("=", 1) for e in cfg.get("Env") or [] if "=" in e)
            for a in args:
                k, _, v = a.partition("=")
                env[k] = v
            cfg["Env"] = [f"{k}={v}" for k, v in env.items()]
        elif c == "LABEL":
            labels = cfg.setdefault("Labels", {}) or {}
            cfg["Labels"] = labels
            for a in args:
                k, _, v = a.partition("=")
                labels[k] = v
        elif c in ("CMD", "ENTRYPOINT"):
            value = args if st["json"] else (cfg.get("Shell") or ["/bin/sh", "-c"]) + [args[0]]
            cfg["Cmd" if c == "CMD" else "Entrypoint"] = value
            if c == "CMD":
                cmd_set_here = True
            elif not cmd_set_here:
                cfg["Cmd"] = None  # Docker: an ENTRYPOINT drops a CMD inherited from the base
        elif c == "WORKDIR":
            cfg["WorkingDir"] = posixpath.normpath(posixpath.join(cfg.get("WorkingDir") or "/",
                                                                  args[0]))
        elif c == "USER":
            cfg["User"] = args[0]
        elif c == "EXPOSE":
            ports = cfg.setdefault("ExposedPorts", {}) or {}
            cfg["ExposedPorts"] = ports
            for a in args:
                ports[a if "/" in a else f"{a}/tcp"] = {}
        elif c == "VOLUME":
            vols = cfg.setdefault("Volumes", {}) or {}
            cfg["Volumes"] = vols
            for a in args:
                vols[a] = {}
        elif c == "STOPSIGNAL":
            cfg["StopSignal"] = args[0]
        elif c == "SHELL":
            cfg["Shell"] = args
        elif c == "ONBUILD":
            cfg.setdefault("OnBuild", []).append(args[0])
        elif c == "MAINTAINER":
            config["author"] = args[0]
        elif c == "HEALTHCHECK":
            cfg["Healthcheck"] = {"Test": ["NONE"]} if args == ["NONE"] else \
                {"Test": (["CMD"] + args[1:]) if st["json"] else ["CMD-SHELL", " ".join(args[1:])]}
        elif c in ("COPY", "ADD"):
            made = ctx.path(p["layers"][str(n)])  # a CopyLayer action's output
            info = json.loads((made / "info.json").read_text())
            add_blob(out, made / "layer", info["mediaType"])
            descs.append({k: info[k] for k in ("mediaType", "digest", "size")})
            diff_ids.append(info["diff_id"])
            empty = False
        elif c == "RUN":
            raise _fail(p, st, "internal: a RUN reached the Python assembler")
        entry = {"created_by": st["original"].strip().splitlines()[0][:200]}
        if empty:
            entry["empty_layer"] = True
        history.append(entry)
    _finish(out, config, descs, history)


@action_function("CopyLayer", version=5)  # 5: implicit parents 0755 whatever the umask
def copy_layer(ctx: ExecContext) -> None:
    """One COPY/ADD of a stage without RUN, as its own cached action: a change to what a
    later instruction copies does not redo this layer (BuildKit caches the same way)."""
    p = ctx.params
    compressors.check(ctx, "gzip")
    workdir = "/"
    if p["base"]["path"]:  # only when the destination is relative
        cfg = read_image(ctx.path(p["base"]["path"]), p["platform"]).config.get("config") or {}
        workdir = cfg.get("WorkingDir") or "/"
    for w in p["workdirs"]:
        workdir = posixpath.normpath(posixpath.join(workdir, w))
    info = _copy_layer(ctx, p["step"], workdir)
    out = ctx.path(ctx.outputs[0])
    os.replace(ctx.path(".layer"), out / "layer")
    (out / "info.json").write_text(json.dumps({**info.descriptor(), "diff_id": info.diff_id},
                                              sort_keys=True))


def _owner(p, st) -> tuple[int, int]:
    chown = st["flags"].get("chown")
    if not chown:
        return 0, 0
    user, _, group = chown.partition(":")
    ids = {"root": 0}
    try:
        uid = int(user) if user.isdigit() else ids[user]
        gid = int(group) if group.isdigit() else ids[group] if group else uid
    except KeyError:
        raise _fail(p, st, f"--chown={chown}: only numeric ids (and root) can be used in a stage "
                    "without RUN, which has no /etc/passwd to look names up in") from None
    return uid, gid


def _copy_layer(ctx: ExecContext, st: dict, workdir: str):
    """The layer of one COPY/ADD, written to `.layer` in the scratch directory."""
    p = ctx.params
    staging = ctx.path(".copy")
    staging.mkdir()
    dest = st["args"][-1]
    dest_abs = posixpath.normpath(posixpath.join(workdir, dest))
    into_dir = dest.endswith("/") or len(st["args"]) > 2
    heredocs = {h[0]: h for h in st["heredocs"]}
    frm = st["flags"].get("from")
    if heredocs:
        for src in st["args"][:-1]:
            name = src.lstrip("<-").strip("'\"")
            target = posixpath.join(dest_abs, name) if into_dir and len(heredocs) > 1 else dest_abs
            _write(staging, target, heredocs[name][1].encode())
    elif frm is not None:
        root = Path(tempfile.mkdtemp(dir=ctx.scratch, prefix=".from-"))
        img = read_image(ctx.path(p["from"][frm]), p["platform"])
        for src, real in _unpack_sources(root, [b for _, b in img.layers], st["args"][:-1]):
            if real is None:
                raise _fail(p, st, f"{src} does not exist in {frm}")
            path = root / real
            name = posixpath.basename(src.rstrip("/"))
            is_dir = path.is_dir() and not path.is_symlink()
            target = dest_abs if is_dir or not (into_dir or len(st["args"]) > 2) \
                else posixpath.join(dest_abs, name)
            _place(path, staging, target)
        shutil.rmtree(root, ignore_errors=True)
    else:
        files = p["copies"].get(str(st["line"]), [])
        for src in st["args"][:-1]:
            pat = posixpath.normpath(src.lstrip("/"))
            pat = "" if pat == "." else pat
            for f in files:
                rel = _relative_to_source(f, pat)
                if rel is None:
                    continue
                path = ctx.path(_context_file(p, f))
                if st["cmd"] == "ADD" and f.endswith(TAR_SUFFIXES):
                    safe_extract(path, staging / dest_abs.lstrip("/"))
                    continue
                if rel == "":  # the source named this file itself
                    target = posixpath.join(dest_abs, posixpath.basename(f)) if into_dir else dest_abs
                else:
                    target = posixpath.join(dest_abs, rel)
                _place(path, staging, target)
    uid, gid = _owner(p, st)
    mode = st["flags"].get("chmod")
    with open(ctx.path(".layer"), "wb") as fh:
        info = layer_from_dir(staging, fh, uid=uid, gid=gid, mtime=ctx.source_date_epoch,
                                     compress=True, mode_override=int(mode, 8) if mode else None,
                                     override_under=dest_abs)
    shutil.rmtree(staging, ignore_errors=True)
    return info


def _relative_to_source(f: str, pat: str) -> str | None:
    """Where context file `f` goes relative to the destination, for source `pat`:
    "" when `pat` names `f` itself, its path below a named directory, else None."""
    if not pat:
        return f
    if f == pat:
        return ""
    if f.startswith(pat + "/"):
        return f[len(pat) + 1:]
    rx = re.compile("".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
                            for c in pat) + r"\Z")
    parts = f.split("/")
    for k in range(1, len(parts) + 1):
        if rx.match("/".join(parts[:k])):
            return "" if k == len(parts) else "/".join(parts[k - 1:])
    return None


def _unpack_sources(root: Path, blobs: list[Path], sources: list[str]):
    """(source, its real path under `root`) for each COPY --from source, unpacking only
    what they name: a large base image below a few copied files is read, not written.
    Globs (rare in COPY --from) unpack the whole image."""
    if not any(c in s for s in sources for c in "*?["):
        try:
            return _unpack_named(root, blobs, sources)
        except UnsafePathError:
            pass  # e.g. a hard link to a file not unpacked: unpack everything below
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
    apply_layers(blobs, root)
    out = []
    for s in sources:
        matches = _image_glob(root, s)
        out += [(s, m.lstrip("/")) for m in matches] or [(s, None)]
    return out


def _unpack_named(root: Path, blobs: list[Path], sources: list[str]):
    """One pass over the layers when no symlink is on the way (the usual `COPY
    --from=build /out/ /`). A symlink met on the way (`/lib -> usr/lib`, `libx.so.2 ->
    libx.so.2.5`) was unpacked with the path's ancestors, so it is followed on disk and
    only its target is unpacked in a further pass."""
    real = {s: posixpath.normpath(s.strip("/")).lstrip(".") for s in sources}
    todo = set(real.values())
    for _ in range(8):
        def include(rel: str) -> bool:
            return any(w == "" or rel == w or rel.startswith(w + "/") or
                       w.startswith(rel + "/") for w in todo)
        apply_layers(blobs, root, include=include)
        todo = set()
        for s, r in real.items():
            if r is None or _plain_path(root, r):
                continue
            resolved = "/".join(resolve_on_disk(root, r))
            if resolved == r:  # no symlink on the way: the image has no such path
                real[s] = None
            else:
                real[s] = resolved
                todo.add(resolved)
        if not todo:
            return list(real.items())
    raise UnsafeLayerError("symbolic links chained too deep for a partial unpack")


def _plain_path(root: Path, rel: str) -> bool:
    """`rel` exists under `root` and no component of it is a symlink."""
    cur = root
    for part in [x for x in rel.split("/") if x]:
        cur = cur / part
        if cur.is_symlink() or not cur.exists():
            return False
    return True


def _image_glob(root: Path, src: str) -> list[str]:
    """Paths in an unpacked image that `src` names (glob in the last component only)."""
    parent, _, last = src.rstrip("/").rpartition("/")
    base = _resolve_in(root, parent)
    if base is None or not base.is_dir():
        return []
    if not any(c in last for c in "*?["):
        return [f"{parent}/{last}"] if (base / last).exists() or (base / last).is_symlink() else []
    import fnmatch
    return sorted(f"{parent}/{n}" for n in os.listdir(base) if fnmatch.fnmatchcase(n, last))


def _resolve_in(root: Path, path: str) -> Path | None:
    """`path` inside `root`, following symlinks as the image would (chroot-like)."""
    cur = root
    parts = [x for x in path.split("/") if x not in ("", ".")]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            cur = cur.parent if cur != root else root
            continue
        nxt = cur / part
        if nxt.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(nxt)
            parts = [x for x in target.split("/") if x not in ("", ".")] + parts
            cur = root if target.startswith("/") else cur
            continue
        cur = nxt
    return cur


def _parents(dst: Path) -> None:
    """Create the missing parents of `dst` as Docker does, 0755: mkdir's mode would be
    the umask's, and reach the layer's bytes."""
    missing = []
    p = dst.parent
    while not p.exists() and not p.is_symlink():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        d.chmod(0o755)


def _place(src: Path, staging: Path, target: str) -> None:
    dst = staging / target.lstrip("/")
    _parents(dst)
    if src.is_symlink():
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


def _write(staging: Path, target: str, data: bytes) -> None:
    dst = staging / target.lstrip("/")
    _parents(dst)
    dst.write_bytes(data)
    dst.chmod(0o644)  # a here-document's file, as Docker writes it, whatever the umask


# --- foreign architectures ---------------------------------------------------------------

BINFMT = "/proc/sys/fs/binfmt_misc"
_QEMU_NAMES = {"arm64": "aarch64", "amd64": "x86_64", "armhf": "arm", "i386": "i386",
               "ppc64el": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
EMULATION_HINT = ("install qemu-user-static and binfmt-support (apt-get install "
                  "qemu-user-static binfmt-support), mount binfmt_misc if it is not (mount -t "
                  "binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc), then enable it "
                  "(update-binfmts --enable); dev/setup.sh does all three")


def emulator(arch: str) -> tuple[str | None, str | None]:
    """(the interpreter the kernel runs `arch`'s programs with, None) when binfmt_misc
    has one registered with the F flag, which a container needs: the kernel opens the
    interpreter when it is registered, so it need not exist inside the container's root.
    Else (None, what is missing)."""
    name = _QEMU_NAMES.get(arch, arch)
    if not os.path.isfile(f"{BINFMT}/status"):
        return None, f"binfmt_misc is not mounted at {BINFMT}"
    try:
        text = Path(f"{BINFMT}/qemu-{name}").read_text()
    except OSError:
        return None, f"no emulator for {arch} is registered in binfmt_misc (qemu-{name})"
    fields = dict(line.split(None, 1) for line in text.splitlines() if " " in line)
    if not text.startswith("enabled"):
        return None, f"the emulator for {arch} (qemu-{name}) is registered but disabled"
    if "F" not in fields.get("flags:", ""):
        return None, (f"the emulator for {arch} (qemu-{name}) is registered without the F flag "
                      "(fix-binary), so it cannot run inside a container")
    interp = fields.get("interpreter", "").strip()
    real = os.path.realpath(interp)
    if not os.path.isfile(real):
        return None, f"the emulator for {arch} names {interp}, which does not exist"
    return real, None


# --- DockerStage -----------------------------------------------------------------------

@action_function("DockerStage", version=2)  # 2: the compressor in the key
def docker_stage(ctx: ExecContext) -> None:
    p = ctx.params
    compressors.check(ctx, "gzip")
    out = ctx.path(ctx.outputs[0])
    c = dockerengine.client()
    parent, descs = _start(ctx, out)  # the parent's blobs, linked into the result as they are
    parent_diff_ids = list(parent["rootfs"]["diff_ids"])
    base = dockerengine.ensure_loaded(c, ctx.path(p["base"]["path"])) if p["base"]["path"] \
        else "scratch"
    context = ctx.path(".context")
    context.mkdir()
    for files in p["copies"].values():
        for f in files:
            dst = context / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.link(ctx.path(_context_file(p, f)), dst)
    lines, step_lines = [f"FROM {base}"], [0]
    for st in p["steps"]:
        lines.append(_engine_instruction(c, ctx, st, context))
        step_lines.append(st["line"])
    platform = None
    if p.get("emulator"):  # a foreign architecture: its commands run under qemu-user
        _, problem = emulator(p["platform"].split("/")[1])
        if problem:
            raise ActionFailed(f"{p['dockerfile']}: stage {p['stage']} RUNs commands for "
                               f"{p['platform']}, and {problem}", hint=EMULATION_HINT)
        platform = p["platform"]
    image_id = dockerengine.build(c, context, "\n".join(lines) + "\n", p["args"], step_lines,
                                  p["dockerfile"], platform=platform, network=p.get("network"))
    local = dockerengine.local_layers(c, image_id)
    if local is not None:  # read in place: the base's layers are not streamed out again
        engine_config, dirs = json.loads(local[0]), local[1]
        new_layers = [(lambda fh, d=d: layer_from_overlay_diff(
            d, fh, mtime=ctx.source_date_epoch, compress=True)) for d in dirs[len(parent_diff_ids):]]
    else:
        saved = ctx.path(".saved.tar")
        dockerengine.save(c, image_id, saved)
        tmp_layout = ctx.path(".engine-layout")
        import_archive(saved, tmp_layout)
        saved.unlink()
        img = read_image(tmp_layout, None)
        engine_config = img.config
        new_layers = [(lambda fh, b=blob: normalise(b, fh, mtime=ctx.source_date_epoch,
                                                     compress=True))
                      for _, blob in img.layers[len(parent_diff_ids):]]
    if engine_config["rootfs"]["diff_ids"][:len(parent_diff_ids)] != parent_diff_ids:
        raise ActionFailed("the engine's result does not start with the parent's layers")
    config = copy.deepcopy(engine_config) | {"rootfs": {"type": "layers",
                                                        "diff_ids": list(parent_diff_ids)}}
    # the engine may record its own platform for an emulated build: the stage's is the truth
    config["os"], config["architecture"] = p["platform"].split("/")[:2]
    history = [h for h in engine_config.get("history", [])]
    for n, write_layer in enumerate(new_layers):
        tmp = ctx.path(f".norm-{n}")
        with open(tmp, "wb") as fh:
            info = write_layer(fh)
        add_blob(out, tmp, info.media_type)
        tmp.unlink()
        descs.append(info.descriptor())
        config["rootfs"]["diff_ids"].append(info.diff_id)
    _finish(out, config, descs, history)


def _engine_instruction(c, ctx: ExecContext, st: dict, context: Path) -> str:
    """One instruction for the engine's classic builder, which knows no heredocs and
    no stage names: heredocs become exec-form shell scripts or context files, and
    --from names become the tags of images forge loaded."""
    p = ctx.params
    cmd, flags = st["cmd"], dict(st["flags"])
    if cmd == "RUN":
        if flags:
            raise _fail(p, st, f"--{next(iter(flags))} needs BuildKit; the engine's classic "
                        "builder cannot run it")
        if st["heredocs"]:
            script = st["original"].split(None, 1)[1]
            return "RUN " + json.dumps(["/bin/sh", "-c", script])
        return st["original"]
    if cmd in ("COPY", "ADD"):
        if "chmod" in flags or "link" in flags or "parents" in flags:
            raise _fail(p, st, "--chmod, --link and --parents need BuildKit; move this COPY to "
                        "a stage without RUN, where forge assembles it itself")
        srcs = list(st["args"][:-1])
        if st["heredocs"]:
            docs = {h[0]: h for h in st["heredocs"]}
            new = []
            for s in srcs:
                name = s.lstrip("<-").strip("'\"")
                fname = f".forge-heredoc-{st['line']}-{name}"
                (context / fname).write_text(docs[name][1])
                new.append(fname)
            srcs = new
        if "from" in flags:
            flags["from"] = dockerengine.ensure_loaded(c, ctx.path(p["from"][flags["from"]]))
        opts = "".join(f" --{k}={v}" for k, v in flags.items())
        return f"{cmd}{opts} " + json.dumps(srcs + [st["args"][-1]])
    return st["original"]


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(assemble_stage, copy_layer, docker_stage)
