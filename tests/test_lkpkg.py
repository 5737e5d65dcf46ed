"""linuxkit_package: LinuxKit package directories (build.yml + Dockerfile) written here in
LinuxKit's format, their tag against real git, and assemblies naming them by label and by
tag. Stages without RUN need no engine; the network test runs RUN stages on Docker."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import Workspace, require
from test_linuxkit import _kernel_tar

BUILD_YML = """\
image: hello
org: example
extra-sources:
  - ../../common:/common
config:
  capabilities:
    - CAP_NET_ADMIN
  binds:
    - /var:/var
labels:
  com.example.team: os
"""

ASSEMBLY = """\
kernel:
  image: //kimg:kimg
  cmdline: "console=ttyS0"
services:
  - name: bylabel
    image: //pkgs:hello
  - name: bytag
    image: {tag}
    binds.add: ["/etc:/etc:ro"]
"""


def make(root: Path, cache: Path) -> Workspace:
    root.mkdir(parents=True)
    (root / "forge.toml").write_text("")
    w = Workspace(root, cache)
    w.write({
        "pkgs/BUILD": "linuxkit_packages()\n",
        "pkgs/hello/build.yml": BUILD_YML,
        "pkgs/hello/Dockerfile": "FROM scratch\nCOPY hello.txt /etc/hello.txt\n"
                                 "COPY common/ /usr/share/common/\nCMD [\"/bin/hello\"]\n",
        "pkgs/hello/hello.txt": "hello\n",
        "pkgs/hello/sub/run.sh": "#!/bin/sh\n",
        "common/shared.txt": "shared\n",
        "kimg/Dockerfile": "FROM scratch\nCOPY kernel kernel.tar /\n",
        "kimg/BUILD": 'container_image(name = "kimg", srcs = ["kernel", "kernel.tar"])\n',
        "BUILD": 'linuxkit_image(name = "os", assembly = "os.yml", packages = ["//pkgs:hello"], '
                 'formats = ["tar"])\n',
    })
    (root / "pkgs/hello/sub/run.sh").chmod(0o755)
    (root / "pkgs/hello/link").symlink_to("hello.txt")
    (root / "kimg/kernel").write_bytes(b"\0FAKEKERNEL" * 10)
    (root / "kimg/kernel.tar").write_bytes(_kernel_tar())
    return w


def git_tag(root: Path) -> str:
    """The tag LinuxKit gives pkgs/hello in a clean checkout: git's tree ids of the
    package and of its extra source, combined as pkglib does."""
    git = ["git", "-C", str(root), "-c", "user.email=t@e", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A", "pkgs", "common"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)

    def tree(path: str) -> str:
        return subprocess.run(git + ["ls-tree", "HEAD", "--", path], check=True,
                              capture_output=True, text=True).stdout.split()[2]
    return "example/hello:" + hashlib.sha1((tree("pkgs/hello") + tree("common")).encode()).hexdigest()


def info(root: Path, label: str) -> dict:
    from forge.analysis import Analyzer
    from forge.labels import parse_pattern
    from forge.workspace import Workspace as ForgeWorkspace
    an = Analyzer(ForgeWorkspace(root))
    roots = an.expand([parse_pattern(label)])
    return an.analyze(roots).infos[roots[0]].extra


@pytest.fixture
def pk(tmp_path):
    require(shutil.which("git") is not None, "git is not installed")
    return make(tmp_path / "ws", tmp_path / "cache")


def image_of(w: Workspace, extra: dict):
    from forge.formats.image.layout import read_image
    return read_image(w.root / extra["image"])


def test_tag_is_what_git_computes_and_the_image_has_the_config_label(pk):
    tag = git_tag(pk.root)
    extra = info(pk.root, "//pkgs:hello")
    assert extra["linuxkit_tag"] == tag and extra["load"]["params"]["tag"] == tag
    r = pk.build("//pkgs:hello")
    assert r.code == 0, r.err
    img = image_of(pk, extra)
    labels = img.config["config"]["Labels"]
    assert json.loads(labels["org.mobyproject.config"]) == {
        "capabilities": ["CAP_NET_ADMIN"], "binds": ["/var:/var"]}
    assert labels["com.example.team"] == "os" and img.config["config"]["Cmd"] == ["/bin/hello"]
    names = set()
    for _, blob in img.layers:
        with tarfile.open(blob) as t:
            names |= {m.name for m in t.getmembers() if m.isfile()}
    # the extra source lands at its dst in the build context (COPY common/)
    assert names == {"etc/hello.txt", "usr/share/common/shared.txt"}
    # oci_push of a package: its own name and tag unless told otherwise
    pk.write({"push/BUILD": 'oci_push(name = "push", image = "//pkgs:hello")\n'})
    params = info(pk.root, "//push:push")["run"]["params"]
    repository, hash_ = tag.split(":")
    assert (params["repository"], params["tags"]) == (repository, [hash_])


def test_assembly_names_the_package_by_label_and_by_tag(pk):
    tag = git_tag(pk.root)
    pk.write({"os.yml": ASSEMBLY.format(tag=tag)})
    q = pk.forge("query", "deps(//:os)")
    assert q.code == 0 and "//pkgs:hello" in q.out.split(), q.err
    r = pk.build("//:os")
    assert r.code == 0, r.err  # a pull of the tag would fail: no registry, nothing pinned
    unpacks = [e for e in r.event_list if e.get("mnemonic") == "LkUnpack"]
    assert len(unpacks) == 1  # one image, named two ways
    with tarfile.open(pk.root / "forge-out/os.tar") as t:
        configs = {n: json.load(t.extractfile(f"containers/services/{n}/config.json"))
                   for n in ("bylabel", "bytag")}
    for name, cfg in configs.items():  # defaults from the package's org.mobyproject.config
        assert "CAP_NET_ADMIN" in cfg["process"]["capabilities"]["bounding"], name
        assert "/var" in {m["destination"] for m in cfg["mounts"]}, name
    assert "/etc" in {m["destination"] for m in configs["bytag"]["mounts"]}


def test_an_old_tag_of_a_listed_package_is_an_error_at_its_line(pk):
    pk.write({"os.yml": ASSEMBLY.format(tag="example/hello:" + "0" * 40)})
    r = pk.build("//:os", "--nobuild")
    assert r.code == 2  # a mistake in the workspace's files: forge's usage exit code
    assert r.err.startswith(f"os.yml:8:5: error: 'example/hello:{'0' * 40}' names //pkgs:hello "
                            "by a tag it no longer has"), r.err
    assert "hint: write image: example/hello:" in r.err


def test_bad_build_yml_key_is_an_error_at_its_line(pk):
    pk.write({"pkgs/hello/build.yml": BUILD_YML.replace("extra-sources:", "extra-source:")})
    r = pk.build("//pkgs:hello")
    assert r.code == 2
    assert r.err.startswith("pkgs/hello/build.yml:3:1: error: unknown key 'extra-source' in "
                            "build.yml; did you mean 'extra-sources'?"), r.err
    pk.write({"pkgs/hello/build.yml": "image: hello\narches: [arm64]\n"})
    r = pk.build("//pkgs:hello")
    assert r.code == 2 and "pkgs/hello/build.yml:2:9: error: package hello is not built for" in r.err


def test_a_change_in_an_extra_source_rebuilds_its_layer_and_changes_the_tag(pk):
    before = info(pk.root, "//pkgs:hello")["linuxkit_tag"]
    r = pk.build("//pkgs:hello")
    assert r.code == 0, r.err
    (pk.root / "common/shared.txt").write_text("changed\n")
    after = info(pk.root, "//pkgs:hello")["linuxkit_tag"]
    assert after != before and after == git_tag(pk.root)
    r = pk.build("//pkgs:hello")
    assert r.code == 0, r.err
    # the COPY of common/ (step 1) reruns, not the COPY of hello.txt (step 0)
    status = {e["outputs"][0].rsplit("/", 1)[-1]: e["status"] for e in r.event_list
              if e["type"] == "action" and e["mnemonic"] == "CopyLayer"}
    assert status == {"0": "cached", "1": "executed"}, status


def engine_ok() -> bool:
    try:
        import docker
        docker.from_env(timeout=5).ping()
        return True
    except Exception:
        return False


NET_DOCKERFILE = """\
FROM scratch AS tools
COPY busybox /bin/busybox
FROM tools
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox cat /proc/net/dev > /netdev"]
"""


@pytest.mark.real
def test_run_stages_have_no_network_unless_build_yml_says_so(tmp_path):
    require(engine_ok(), "no Docker engine answers (start dockerd)")
    require(Path("/bin/busybox").is_file(), "busybox-static is not installed")
    w = make(tmp_path / "ws", tmp_path / "cache")
    for name, network in (("off", "false"), ("on", "true")):
        w.write({f"pkgs/{name}/build.yml": f"image: net-{name}\norg: forgetest\nnetwork: {network}\n",
                 f"pkgs/{name}/Dockerfile": NET_DOCKERFILE})
        shutil.copy("/bin/busybox", w.root / f"pkgs/{name}/busybox")
    r = w.build("//pkgs:off", "//pkgs:on", timeout=600)
    assert r.code == 0, r.err
    from forge.formats.image.layout import read_image
    devices = {}
    for name in ("off", "on"):
        img = read_image(w.root / info(w.root, f"//pkgs:{name}")["image"])
        with tarfile.open(img.layers[-1][1]) as t:
            lines = t.extractfile("netdev").read().decode().splitlines()[2:]
        devices[name] = {ln.split(":")[0].strip() for ln in lines}
    assert devices["off"] == {"lo"} and len(devices["on"]) > 1, devices
    # forge load with no tag: the package's own
    import docker
    tag = info(w.root, "//pkgs:off")["linuxkit_tag"]
    r = w.forge("load", "//pkgs:off", "--cache-dir", str(w.cache), timeout=300)
    try:
        assert r.code == 0, r.err
        assert f"loaded as {tag}" in r.err
        docker.from_env().images.get(tag)
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
