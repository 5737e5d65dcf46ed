"""The reference init's side of runtime.json, run for real on this machine: forge writes a
bundle's config.json and runtime.json, the init's own scripts (common.sh's prepare_bundle,
runtime-json.awk, runtime-hook) run under busybox, and runc runs the container. Each test
runs in new mount and network namespaces (`unshare`), so the host's interfaces and mounts
are never touched. Booting the whole init is tested in test_redisos.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require
from forge.formats.linuxkit import assembly as asmlib
from forge.formats.linuxkit.runtime import runtime_config

pytestmark = pytest.mark.real

LIB = Path(__file__).resolve().parent.parent / "examples/images/init/lib"
APPLETS = ("sh", "awk", "sed", "grep", "ip", "nsenter", "mount", "mkdir", "mv", "cat", "dirname",
           "tr", "ls", "readlink", "echo", "printf")


@pytest.fixture
def host(tmp_path):
    require(os.geteuid() == 0, "needs root (network namespaces, mounts)")
    require(Path("/bin/busybox").is_file(), "busybox-static is not installed")
    require(shutil.which("runc") is not None, "runc is not installed (apt-get install runc)")
    require(shutil.which("unshare") is not None, "unshare (util-linux) is missing")
    probe = subprocess.run(["unshare", "--mount", "--net", "true"], capture_output=True)
    require(probe.returncode == 0, f"cannot make namespaces here: {probe.stderr.decode()}")
    bb = tmp_path / "bb"  # busybox's applets, as the init has them; runc beside them
    bb.mkdir()
    for a in APPLETS:
        (bb / a).symlink_to("/bin/busybox")
    (bb / "runc").symlink_to(shutil.which("runc"))
    return tmp_path


def bundle(root: Path, yml: str) -> Path:
    """A read-only bundle (so no overlay) of busybox, from the entry in `yml` (a services
    list), with config.json and runtime.json as LkBundle writes them."""
    asm = asmlib.load([("t.yml", yml)])
    e = asm.services[0]
    d = root / "containers/services" / e.name
    (d / "rootfs/bin").mkdir(parents=True)
    for sub in ("proc", "dev", "sys", "tmp"):
        (d / "rootfs" / sub).mkdir()
    shutil.copy("/bin/busybox", d / "rootfs/bin/busybox")
    config, runtime = runtime_config(e, {}, {}, asmlib.allocate_ids(asm), readonly_default=True)
    (d / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    (d / "runtime.json").write_text(json.dumps(runtime, indent=4) + "\n")
    return d


def run_init(host: Path, script: str) -> subprocess.CompletedProcess:
    """`script` after sourcing common.sh, under busybox sh with only busybox (and runc) on
    PATH, in fresh mount and network namespaces."""
    text = (f". {LIB}/common.sh\nPATH={host}/bb\nset -e\n" + script)
    return subprocess.run([shutil.which("unshare"), "--mount", "--net", "--propagation", "private",
                           "/bin/busybox", "sh", "-c", text], capture_output=True, text=True,
                          timeout=120, env={"FORGE_LIB": str(LIB), "FORGE_CONSOLE": str(host / "console"),
                                            "PATH": f"{host}/bb"})


SERVICE = """\
services:
  - name: c1
    image: x
    net: new
    command: ["/bin/busybox", "sh", "-c", "/bin/busybox ip -o link; /bin/busybox ls /sys/class/net"]
    runtime:
      interfaces:
        - name: vc0
          peer: vh0
      bindNS:
        net: {netns}
        uts: {uts}
"""


def test_interfaces_and_bind_ns_are_applied_before_the_container_runs(host):
    netns, uts = host / "run/netns/c1", host / "run/uts/c1"
    d = bundle(host, SERVICE.format(netns=netns, uts=uts))
    r = run_init(host, f"""
prepare_bundle {d}
runc --root {host}/runc run --bundle {d} c1 </dev/null
echo "== root"
ip -o link
echo "== bound"
nsenter --net={netns} ip -o link
grep -c " {netns} \\| {uts} " /proc/self/mountinfo
""")
    assert r.returncode == 0, r.stdout + r.stderr
    container, rest = r.stdout.split("== root")
    root, bound = rest.split("== bound")
    # The veth's named end is inside the container; its peer stayed in the root namespace.
    assert "vc0" in container and "vh0" not in container, r.stdout
    assert "vh0" in root and "vc0" not in root, r.stdout
    # The container's netns outlives it at the bindNS path, where another entry can join it.
    assert "vc0" in bound, r.stdout
    assert bound.split()[-1] == "2", r.stdout  # net and uts both bound
    # The hook is in config.json, once, however often the bundle is prepared.
    config = json.loads((d / "config.json").read_text())
    assert [h["path"] for h in config["hooks"]["createRuntime"]] == [f"{LIB}/runtime-hook"]


def test_an_existing_interface_is_moved_and_a_missing_one_stops_the_container(host):
    yml = SERVICE.format(netns=host / "n", uts=host / "u").replace(
        "        - name: vc0\n          peer: vh0\n", "        - name: moveme\n")
    d = bundle(host, yml)
    r = run_init(host, f"""
ip link add name moveme type veth
prepare_bundle {d}
runc --root {host}/runc run --bundle {d} c1 </dev/null
echo "== root"
ip -o link
""")
    assert r.returncode == 0, r.stdout + r.stderr
    container, root = r.stdout.split("== root")
    assert "moveme" in container and "moveme" not in root, r.stdout
    # Without it, the hook fails and runc does not start the container (as LinuxKit).
    r = run_init(host, f"""
prepare_bundle {d}
if runc --root {host}/runc run --bundle {d} c1 </dev/null; then echo STARTED; fi
""")
    assert "STARTED" not in r.stdout and "cannot move interface moveme" in r.stderr, r.stdout + r.stderr


def test_runtime_json_actions_and_namespace(host):
    yml = """\
services:
  - name: c2
    image: x
    runtime:
      mkdir: ["/var/lib/c2", "data"]
      namespace: tenant
      interfaces:
        - name: wg0
          add: wireguard
          createInRoot: true
"""
    d = bundle(host, yml)
    r = subprocess.run(["/bin/busybox", "awk", "-f", str(LIB / "runtime-json.awk"), str(d / "runtime.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [x.split("\037") for x in r.stdout.splitlines()] == [
        ["mkdir", "/var/lib/c2"], ["mkdir", "data"], ["iface", "wg0", "wireguard", "", "1"],
        ["namespace", "tenant"]]
    r = run_init(host, f"""
prepare_bundle {d}
echo "ns=$NAMESPACE root=$(runc_root "$NAMESPACE") default=$(runc_root '')"
""")
    assert r.returncode == 0, r.stderr
    assert "ns=tenant root=/run/forge/runc/tenant default=/run/runc" in r.stdout


def test_volumes_are_mounted_read_only_or_as_an_overlay(host):
    vols = host / "containers/volumes"
    for name, writable in (("ro", False), ("rw", True)):
        (vols / name / "lower").mkdir(parents=True)
        (vols / name / "merged").mkdir()
        (vols / name / "lower/f").write_text(name)
        if writable:
            (vols / name / "tmp").mkdir()
    rc_init = (LIB / "rc.init").read_text()
    setup = rc_init[rc_init.index("setup_volumes() {"):rc_init.index("\n}\n", rc_init.index("setup_volumes() {")) + 3]
    setup = setup.replace("/containers/volumes", str(vols))
    r = run_init(host, setup + f"""
set +e
setup_volumes
cat {vols}/ro/merged/f {vols}/rw/merged/f
echo x >{vols}/rw/merged/new && echo rw-writable
echo x >{vols}/ro/merged/new 2>/dev/null || echo ro-refused
""")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rorw" in r.stdout and "rw-writable" in r.stdout and "ro-refused" in r.stdout, r.stdout + r.stderr
    console = (host / "console").read_text()
    assert "volume ro: read-only" in console and "volume rw: read-write" in console, console
    assert not (vols / "rw/lower/new").exists()  # writes go to the tmpfs upper layer
