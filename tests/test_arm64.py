"""Building for another architecture than the host's: arm64 RedisOS (examples/images) built
on this amd64 machine (the redis image's RUN stage and the arm64 Debian tree's maintainer
scripts under qemu-user), booted under TCG until Redis answers PING; a multi-arch image
pushed to a real registry as one index and pulled back by platform; and the analysis
errors for an image not built for the arch."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from conftest import Workspace, require
from registry_fixture import registry  # noqa: F401  (fixture)
from test_images import engine_ok

pytestmark = pytest.mark.real
REPO = Path(__file__).resolve().parent.parent


def _machine_ready() -> None:
    from rules.stages import emulator
    for tool in ("mmdebstrap", "qemu-system-aarch64", "arch-test"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (see dev/setup.sh)")
    require(engine_ok(), "no Docker engine answers (dev/setup.sh starts dockerd)")
    _, problem = emulator("arm64")
    require(problem is None, f"arm64 programs cannot run here: {problem} (see dev/setup.sh)")


@pytest.fixture(scope="module")
def arm64_os(tmp_path_factory):
    _machine_ready()
    root = tmp_path_factory.mktemp("arm64") / "ws"
    root.mkdir()
    shutil.copy(REPO / "examples/forge.toml", root / "forge.toml")
    shutil.copytree(REPO / "examples/images", root / "images",
                    ignore=shutil.ignore_patterns("forge-out"))
    w = Workspace(root, root.parent / "cache")
    t0 = time.monotonic()
    r = w.build("//images:redisos-arm64", timeout=1800)
    assert r.code == 0, r.err
    print(f"arm64 RedisOS built cold in {time.monotonic() - t0:.0f} s")
    return w


def test_arm64_redisos_boots_to_pong_under_tcg(arm64_os):
    r = arm64_os.forge("test", "//images:boot_test_arm64", timeout=900)
    assert r.code == 0, r.out + r.err
    assert "PASSED" in r.out, r.out
    print(next(line for line in r.out.splitlines() if "PASSED" in line))


def _elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return int.from_bytes(data[18:20], "little")


def test_every_image_of_the_arm64_os_is_arm64(arm64_os):
    """The OS took the arm64 image of each multi-arch target (`<name>.arm64...`, the host's
    being `<name>...`): arm64 configs, and AArch64 programs (ELF machine 183) inside."""
    import tarfile
    from forge.formats.image.layout import read_image
    out = arm64_os.root / "forge-out/images"
    found = {}
    for what, layout, path in (("redis", "redis/image.arm64.stages/1", "usr/bin/redis-server"),
                               ("busybox", "init/init.arm64.stages/2", "bin/busybox")):
        img = read_image(out / layout, None)
        assert img.config["architecture"] == "arm64"
        for _, blob in img.layers:
            with tarfile.open(blob) as tf:
                for m in tf:
                    if m.name.lstrip("./") == path:
                        found[what] = _elf_machine(tf.extractfile(m).read(64))
    assert found == {"redis": 183, "busybox": 183}
    assert not (out / "redis/image.stages").exists()  # nothing of amd64 was built


def _small_ws(tmp_path, name: str, build: str) -> Workspace:
    root = tmp_path / name
    root.mkdir()
    (root / "forge.toml").write_text("")
    w = Workspace(root, tmp_path / f"{name}-cache")
    w.write({"img/a.txt": "hello\n", "img/Dockerfile": "FROM scratch\nCOPY a.txt /a.txt\n",
             "img/BUILD": build})
    return w


def test_an_image_not_built_for_the_arch_is_named(tmp_path):
    w = _small_ws(tmp_path, "ws", '''
        container_image(name = "one", srcs = ["a.txt"])
        container_image(name = "two", dockerfile = "Dockerfile2", bases = {"base": ":one"},
                        arch = "arm64")
    ''')
    w.write({"img/Dockerfile2": "FROM base\n"})
    r = w.forge("build", "--nobuild", "//img:two")
    assert r.code == 2, r.err  # an analysis error
    assert "is not built for arm64 (it builds amd64)" in r.err
    assert 'add "arm64" to its arches' in r.err
    w.write({"img/BUILD": 'container_image(name = "x", srcs = ["a.txt"], arches = ["arm64", "sparc"])\n'})
    r = w.forge("build", "--nobuild", "//img:x")
    assert r.code == 2 and "unknown architecture 'sparc'" in r.err, r.err


def test_multi_arch_image_is_pushed_as_an_index_and_pulled_by_platform(tmp_path, registry):
    from forge.formats.image.layout import read_image
    from forge.formats.registry.client import RegistryClient
    repo = f"{registry.host}/team/multi"
    w = _small_ws(tmp_path, "producer", f'''
        container_image(name = "img", srcs = ["a.txt"], arches = ["amd64", "arm64"])
        oci_push(name = "push", image = ":img", repository = "{repo}", tags = ["v1"])
    ''')
    r = w.forge("run", "//img:push")
    assert r.code == 0, r.err
    digest = r.out.strip().split("@")[1]
    client = RegistryClient()
    for arch in ("arm64", "amd64"):
        dest = tmp_path / f"pulled-{arch}"
        client.pull(f"{repo}:v1", dest, platform=f"linux/{arch}")
        img = read_image(dest, f"linux/{arch}")
        assert img.config["architecture"] == arch
    # forge's own pull, pinned by the index's digest, takes the platform asked for
    c = Workspace(tmp_path / "consumer", tmp_path / "consumer-cache")
    c.root.mkdir()
    (c.root / "forge.toml").write_text("")
    c.write({"p/BUILD": f'oci_pull(name = "app", image = "{repo}:v1", platform = "linux/arm64")\n'})
    r = c.build("//p:app")
    assert r.code == 0, r.err
    assert json.loads((c.root / "forge.lock").read_text())["pins"]["oci"][f"{repo}:v1"] == digest
    assert read_image(c.root / "forge-out/p/app", "linux/arm64").config["architecture"] == "arm64"


def test_missing_emulation_is_explained(tmp_path, monkeypatch):
    """What binfmt_misc lacks is said: not mounted, no entry, disabled, no F flag."""
    import rules.stages as stages
    binfmt = tmp_path / "binfmt_misc"
    monkeypatch.setattr(stages, "BINFMT", str(binfmt))
    assert "binfmt_misc is not mounted" in stages.emulator("arm64")[1]
    binfmt.mkdir()
    (binfmt / "status").write_text("enabled\n")
    assert "no emulator for arm64 is registered" in stages.emulator("arm64")[1]
    interp = tmp_path / "qemu-aarch64-static"
    interp.write_bytes(b"")
    entry = binfmt / "qemu-aarch64"
    entry.write_text(f"disabled\ninterpreter {interp}\nflags: PF\n")
    assert "registered but disabled" in stages.emulator("arm64")[1]
    entry.write_text(f"enabled\ninterpreter {interp}\nflags: P\n")
    assert "without the F flag" in stages.emulator("arm64")[1]
    entry.write_text(f"enabled\ninterpreter {interp}\nflags: PF\n")
    assert stages.emulator("arm64") == (str(interp), None)
    assert "install qemu-user-static" in stages.EMULATION_HINT
    assert "update-binfmts --enable" in stages.EMULATION_HINT
