"""Image rules against a real Docker engine and a real Debian mirror (mmdebstrap).

One Debian base is built per test session into a shared cache; the workspaces of the
tests below get it from that cache, as a team's machines would from a shared one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import Workspace, require

pytestmark = pytest.mark.real

BASE_BUILD = 'debian_rootfs(name = "bookworm", suite = "bookworm")\n'


def engine_ok() -> bool:
    try:
        import docker
        docker.from_env(timeout=5).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    require(shutil.which("mmdebstrap") is not None, "mmdebstrap is not installed (apt-get install mmdebstrap)")
    cache = tmp_path_factory.mktemp("image-cache")
    root = tmp_path_factory.mktemp("base-ws")
    (root / "forge.toml").write_text("")
    w = Workspace(root, cache)
    w.write({"base/BUILD": BASE_BUILD})
    r = w.build("//base:bookworm", timeout=900)
    assert r.code == 0, r.err
    return cache


@pytest.fixture
def iws(tmp_path, shared_cache):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "forge.toml").write_text("")
    w = Workspace(root, shared_cache)
    w.write({"base/BUILD": BASE_BUILD})
    return w


THREE_STAGES = {
    "app/Dockerfile": """\
        ARG GREETING=hello
        FROM debian AS build
        ARG GREETING
        RUN mkdir -p /out && echo "$GREETING" > /out/stamp
        COPY build.txt /out/

        FROM debian AS unused
        RUN echo never > /never

        FROM scratch AS final
        COPY --from=build /out/ /data/
        COPY conf/app.conf /etc/app.conf
        CMD ["/data/stamp"]
        """,
    "app/build.txt": "from build\n",
    "app/conf/app.conf": "setting=1\n",
    "app/BUILD": """\
        container_image(
            name = "app",
            srcs = glob(["**"], exclude = ["Dockerfile"]),
            bases = {"debian": "//base:bookworm"},
            build_args = {"GREETING": "hi"},
        )
        """,
}


def statuses(r) -> dict[str, str]:
    """Output directory below `<target>.stages/` (or the base's name) -> status."""
    return {e["outputs"][0].split(".stages/")[-1].rsplit("/", 1)[-1] if "layers" not in
            e["outputs"][0] else e["outputs"][0].split(".stages/")[-1]: e["status"]
            for e in r.event_list if e["type"] == "action"}


def layer_files(layout: Path) -> dict[str, bytes]:
    """Path -> content of every regular file in the image's layers (later layers win)."""
    import tarfile
    from forge.formats.image.layout import read_image
    img = read_image(layout)
    files = {}
    for _, blob in img.layers:
        with tarfile.open(blob) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    files[m.name.lstrip("./")] = tf.extractfile(m).read()
    return files


def test_debian_rootfs_is_reproducible(iws, tmp_path):
    """A second build with an empty cache gives the same layer and manifest digests."""
    r = iws.build("//base:bookworm")
    assert r.code == 0 and r.err.strip().endswith("0 executed, 2 cached")  # the tree, its SBOM
    first = json.loads((iws.root / "forge-out/base/bookworm/index.json").read_text())
    fresh = Workspace(tmp_path / "fresh", tmp_path / "fresh-cache")
    fresh.root.mkdir()
    (fresh.root / "forge.toml").write_text("")
    fresh.write({"base/BUILD": BASE_BUILD})
    r = fresh.build("//base:bookworm", timeout=900)
    assert r.code == 0, r.err
    second = json.loads((fresh.root / "forge-out/base/bookworm/index.json").read_text())
    assert first["manifests"][0]["digest"] == second["manifests"][0]["digest"]
    # and so are the package list and the SBOM, in another directory with another cache
    for name in ("bookworm.debs.json", "bookworm.sbom.spdx.json"):
        assert (iws.root / "forge-out/base" / name).read_bytes() == \
            (fresh.root / "forge-out/base" / name).read_bytes(), name


def test_three_stages_rerun_only_what_changed(iws):
    require(engine_ok(), "no Docker engine answers (start dockerd)")
    iws.write(THREE_STAGES)
    r = iws.build("//app")
    assert r.code == 0, r.err
    s = statuses(r)
    # One action per stage, and one per COPY of a stage without RUN.
    assert s == {"bookworm": "cached", "build": "executed", "final.layers/0": "executed",
                 "final.layers/1": "executed", "final": "executed", "app.sbom.spdx.json": "executed"}
    assert "unused" not in s  # a stage the target does not need never runs
    files = layer_files(iws.root / "forge-out/app/app.stages/final")
    assert files["data/stamp"] == b"hi\n" and files["data/build.txt"] == b"from build\n"
    assert files["etc/app.conf"] == b"setting=1\n"
    # A file only the last stage copies: only the last stage reruns.
    (iws.root / "app/conf/app.conf").write_text("setting=2\n")
    r = iws.build("//app")
    assert statuses(r) == {"bookworm": "cached", "build": "cached", "final.layers/0": "cached",
                           "final.layers/1": "executed", "final": "executed",
                           "app.sbom.spdx.json": "executed"}
    # A file the first stage copies: everything after it reruns.
    (iws.root / "app/build.txt").write_text("changed\n")
    r = iws.build("//app")
    assert statuses(r) == {"bookworm": "cached", "build": "executed", "final.layers/0": "executed",
                           "final.layers/1": "cached", "final": "executed",
                           "app.sbom.spdx.json": "executed"}
    # A build arg used by the first stage.
    app = (iws.root / "app/BUILD").read_text().replace('"hi"', '"hey"')
    (iws.root / "app/BUILD").write_text(app)
    r = iws.build("//app")
    assert statuses(r)["build"] == "executed"
    assert layer_files(iws.root / "forge-out/app/app.stages/final")["data/stamp"] == b"hey\n"


def test_stages_without_run_build_with_no_engine(iws):
    iws.write({"s/a.txt": "A\n", "s/Dockerfile": """\
        FROM scratch AS one
        COPY a.txt /a.txt
        ENV X=1
        FROM scratch
        COPY --from=one /a.txt /b.txt
        LABEL org.example=yes
        """, "s/BUILD": 'container_image(name = "s", srcs = ["a.txt"])\n'})
    r = iws.build("//s", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert r.code == 0, r.err
    layout = iws.root / "forge-out/s/s.stages/1"
    assert layer_files(layout) == {"b.txt": b"A\n"}
    from forge.formats.image.layout import read_image
    cfg = read_image(layout).config
    assert cfg["config"]["Labels"] == {"org.example": "yes"} and "created" not in cfg


def test_engine_error_names_the_dockerfile_line(iws):
    require(engine_ok(), "no Docker engine answers (start dockerd)")
    iws.write({"bad/Dockerfile": "FROM debian\nRUN true\nRUN echo oops && false\n",
               "bad/BUILD": 'container_image(name = "bad", bases = {"debian": "//base:bookworm"})\n'})
    r = iws.build("//bad")
    assert r.code == 1
    assert "bad/Dockerfile:3: RUN failed" in r.err and "echo oops && false" in r.err


def test_dockerfile_errors_point_into_the_dockerfile(iws):
    iws.write({"e/Dockerfile": "FROM scratch\nRUNN true\n",
               "e/BUILD": 'container_image(name = "e")\n'})
    r = iws.forge("build", "//e")
    assert r.code == 2
    assert r.err.startswith("e/Dockerfile:2:1: error: unknown instruction 'RUNN'")


def test_run_and_load_an_image(iws):
    require(engine_ok(), "no Docker engine answers (start dockerd)")
    r = iws.forge("run", "//base:bookworm", "--", "cat", "/etc/debian_version")
    assert r.code == 0, r.err
    assert r.out.strip().startswith("12")
    r = iws.forge("load", "//base:bookworm", "forge-test/bookworm:dev")
    assert r.code == 0, r.err
    out = subprocess.run(["docker", "image", "inspect", "forge-test/bookworm:dev"],
                         capture_output=True, text=True)
    assert out.returncode == 0


def test_copy_from_follows_symlinks_inside_the_image(iws):
    """/lib and /bin are symlinks into /usr on bookworm, and /bin/sh is a link to dash:
    COPY --from resolves them as the image would, and copies the file's content."""
    iws.write({"l/Dockerfile": """\
        FROM debian AS base
        FROM scratch
        COPY --from=base /lib/x86_64-linux-gnu/libc.so.6 /lib/libc.so.6
        COPY --from=base /bin/sh /bin/sh
        COPY --from=base /etc/debian_version /etc/
        """, "l/BUILD": 'container_image(name = "l", bases = {"debian": "//base:bookworm"})\n'})
    r = iws.build("//l", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert r.code == 0, r.err
    files = layer_files(iws.root / "forge-out/l/l.stages/1")
    assert set(files) == {"lib/libc.so.6", "bin/sh", "etc/debian_version"}
    assert files["bin/sh"][:4] == b"\x7fELF" and len(files["bin/sh"]) > 50_000
    assert files["etc/debian_version"].startswith(b"12")


def test_layers_read_in_place_equal_the_engines_export(iws, tmp_path):
    """The engine's overlay2 layers are read in place (no `docker save` of the whole
    image); the layers must be byte for byte those of the engine's own export, for what
    a RUN can leave behind: deletions below the base (whiteouts), a directory removed and
    made again (opaque), hardlinks, a fifo, a device node, other owners, changed modes."""
    require(engine_ok(), "no Docker engine answers (start dockerd)")
    iws.write({
        "odd/Dockerfile": """\
            FROM debian
            RUN rm -rf /etc/apt/sources.list.d /usr/share/doc/bash && rm /etc/issue \\
                && rm -rf /var/log && mkdir /var/log && echo new > /var/log/fresh \\
                && mkdir -p /x/y && echo a > /x/y/f && ln /x/y/f /x/link && ln -s y/f /x/sym \\
                && mkfifo /x/fifo && mknod /x/null c 1 3 && chown 1234:5678 /x/y/f \\
                && chmod 4750 /x/y && echo more >> /etc/hostname.orig && chmod 700 /root
            RUN rm /x/link && echo b > /x/y/g
            """,
        "odd/BUILD": 'container_image(name = "odd", bases = {"debian": "//base:bookworm"})\n',
    })

    def layers(mode: str) -> list[bytes]:
        shutil.rmtree(iws.root / "forge-out", ignore_errors=True)
        cache = tmp_path / f"cache-{mode}"  # the base, and nothing of this stage
        shutil.copytree(iws.cache, cache, symlinks=True)
        r = iws.build("//odd", "--cache-dir", str(cache), env={"FORGE_ENGINE_EXPORT": mode})
        assert r.code == 0, r.err
        from forge.formats.image.layout import read_image
        img = read_image(iws.root / "forge-out/odd/odd.stages/0")
        return [blob.read_bytes() for _, blob in img.layers]

    here, saved = layers("local"), layers("save")
    assert len(here) == len(saved) and here == saved
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(here[-2])) as tf:  # the first RUN's layer
        names = set(tf.getnames())
    assert {"etc/.wh.issue", "var/log/.wh..wh..opq", "x/fifo", "x/null"} <= names
