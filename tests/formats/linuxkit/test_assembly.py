"""LinuxKit assemblies: the model `load` builds, merging, ids, the OCI config of an entry,
and every error message as data (tests/formats/linuxkit/assembly_cases/errors/<case>/{input.yml,expected.txt})."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge.formats.linuxkit.errors import AssemblyError, Loc
from forge.formats.linuxkit import assembly
from forge.formats.linuxkit import runtime as assembly_oci

CASES = Path(__file__).parent / "assembly_cases"
ERRORS = CASES / "errors"


def read(*names: str) -> assembly.Assembly:
    return assembly.load([(n, (CASES / n).read_text()) for n in names])


def load_text(text: str, name: str = "a.yml") -> assembly.Assembly:
    return assembly.load([(name, text)])


def rendered(e: AssemblyError) -> str:
    return str(e) + (f"\nhint: {e.hint}" if e.hint else "") + "\n"


def test_redis_assembly_model():
    a = read("redis.yml")
    assert a.kernel.image == "linuxkit/kernel:6.6.13"
    assert a.kernel.cmdline == "console=tty0 console=ttyS0"
    assert (a.kernel.binary, a.kernel.tar, a.kernel.ucode) == ("kernel", "kernel.tar", None)
    assert a.init == ["linuxkit/init:v1.0", "linuxkit/runc:v1.0", "linuxkit/containerd:v1.0"]
    [dhcpcd] = a.onboot
    assert (dhcpcd.section, dhcpcd.name, dhcpcd.image) == ("onboot", "dhcpcd", "linuxkit/dhcpcd:v1.0")
    assert dhcpcd.raw["command"] == ["/sbin/dhcpcd", "--nobackground", "-f", "/dhcpcd.conf", "-1"]
    assert dhcpcd.loc == Loc("redis.yml", 10, 5)
    assert a.onshutdown == []
    assert [s.name for s in a.services] == ["getty", "redis"]
    redis = a.services[1]
    assert redis.image == "//images/redis:image"
    assert redis.raw["binds"] == ["/var/lib/redis:/data", "/etc/redis.conf:/etc/redis.conf:ro"]
    assert redis.raw["capabilities"][0] == "CAP_NET_BIND_SERVICE"
    assert redis.raw["sysctl"] == {"net.core.somaxconn": "1024"}
    assert (redis.raw["uid"], redis.raw["net"]) == ("redis", "host")
    assert "readonly" not in redis.raw  # left for the label or the caller's default
    assert redis.locs["binds"] == Loc("redis.yml", 26, 5)
    conf, data = a.files
    assert (conf.path, conf.contents, conf.mode, conf.uid) == (
        "etc/redis.conf", "bind 0.0.0.0\nprotected-mode no\n", 0o644, "redis")
    assert (data.directory, data.mode, data.contents) == (True, 0o700, None)
    [cache] = a.volumes
    assert (cache.name, cache.image, cache.readonly, cache.format) == ("cache", "alpine:3.19", True, "oci")


def test_image_refs_include_forge_labels():
    assert assembly.image_refs(read("redis.yml")) == {
        "linuxkit/kernel:6.6.13", "linuxkit/init:v1.0", "linuxkit/runc:v1.0",
        "linuxkit/containerd:v1.0", "linuxkit/dhcpcd:v1.0", "linuxkit/getty:v1.0",
        "//images/redis:image", "alpine:3.19"}


def test_two_files_merge_kernel_fields_and_concatenate_lists():
    a = read("redis.yml", "extra.yml")
    assert a.kernel.image == "linuxkit/kernel:6.6.13"  # not set again: kept
    assert a.kernel.cmdline == "console=ttyS0 quiet"
    assert a.kernel.tar is None  # tar: none
    assert a.init[-1] == "linuxkit/ca-certificates:v1.0" and len(a.init) == 4
    assert [s.name for s in a.services] == ["getty", "redis", "sshd"]
    assert [f.path for f in a.files] == ["etc/redis.conf", "var/lib/redis", "etc/motd"]
    assert a.services[2].locs["capabilities.add"].file == "extra.yml"


def test_duplicate_service_across_files():
    with pytest.raises(AssemblyError) as e:
        assembly.load([("a.yml", "services: [{name: x, image: i}]"), ("b.yml", "services: [{name: x, image: j}]")])
    assert str(e.value) == "b.yml:1:12: duplicate service name 'x'"
    assert "a.yml:1:12" in e.value.hint


def test_yaml_1_2_scalars():
    a = load_text("services:\n- {name: s, image: i, env: [A=yes, B=on], oomScoreAdj: -500, readonly: True}\n")
    assert a.services[0].raw == {"name": "s", "image": "i", "env": ["A=yes", "B=on"], "oomScoreAdj": -500,
                                 "readonly": True}
    assert load_text("") == load_text("# nothing\n")
    assert load_text("services:\nfiles:\n").services == []


def test_ids_count_from_100_in_section_order():
    a = load_text("""
services: [{name: redis, image: r}]
onshutdown: [{name: sync, image: s}]
onboot: [{name: dhcpcd, image: d}, {name: mount, image: m}]
""")
    assert assembly.allocate_ids(a) == {"dhcpcd": 100, "mount": 101, "sync": 102, "redis": 103}


def test_uid_by_name_and_additional_gids():
    a = load_text("""
onboot: [{name: dhcpcd, image: d}]
services:
  - {name: redis, image: r, uid: redis, gid: root, additionalGids: [dhcpcd, 7]}
""")
    config, _ = assembly_oci.runtime_config(a.services[0], {}, None, assembly.allocate_ids(a))
    assert config["process"]["user"] == {"uid": 101, "gid": 0, "additionalGids": [100, 7]}


def test_redis_config_json_matches_expected():
    a = read("redis.yml")
    image = json.loads((CASES / "redis_image_config.json").read_text())
    config, runtime = assembly_oci.runtime_config(a.services[1], image, None, assembly.allocate_ids(a))
    assert json.dumps(config, indent=4) + "\n" == (CASES / "redis_config.json").read_text()
    assert json.dumps(runtime, indent=4) + "\n" == (CASES / "redis_runtime.json").read_text()


def test_label_defaults_and_add_keys():
    a = read("redis.yml", "extra.yml")
    sshd = a.services[2]
    label = {"capabilities": ["CAP_CHOWN", "CAP_SYS_ADMIN"], "binds": ["/etc/ssh:/etc/ssh:ro"],
             "readonly": True, "pid": "host", "hostname": "sshd"}
    config, _ = assembly_oci.runtime_config(sshd, {"Cmd": ["/usr/sbin/sshd", "-D"]}, label, {},
                                            readonly_default=False)
    caps = config["process"]["capabilities"]
    assert caps["effective"] == ["CAP_CHOWN", "CAP_SYS_ADMIN"]  # the add duplicates one: kept once
    assert caps["bounding"] == ["CAP_CHOWN", "CAP_SYS_ADMIN"]
    binds = {m["destination"]: m for m in config["mounts"] if m["type"] == "bind"}
    assert binds["/etc/ssh"]["options"] == ["ro", "rbind"]
    assert binds["/root/.ssh"] == {"destination": "/root/.ssh", "type": "bind", "source": "/root/.ssh",
                                   "options": ["rw", "rbind", "rshared"]}
    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert "ro" in next(m for m in config["mounts"] if m["destination"] == "/dev")["options"]
    assert config["hostname"] == "sshd"
    assert {"type": "pid"} not in config["linux"]["namespaces"]  # pid: host from the label
    assert config["process"]["args"] == ["/usr/sbin/sshd", "-D"]


def test_entry_key_replaces_label_and_defaults():
    a = load_text("services: [{name: s, image: i, capabilities: [all], net: new, ipc: /proc/1/ns/ipc, "
                  "command: [sh], cwd: /srv, env: [A=1]}]")
    image = {"Entrypoint": ["/init"], "Cmd": ["x"], "Env": ["B=2"], "WorkingDir": "/w"}
    config, runtime = assembly_oci.runtime_config(a.services[0], image, {"capabilities": ["CAP_CHOWN"]}, {})
    p = config["process"]
    assert p["capabilities"]["effective"] == list(assembly.CAPABILITIES)
    assert (p["args"], p["env"], p["cwd"]) == (["sh"], ["A=1"], "/srv")
    assert config["linux"]["namespaces"] == [
        {"type": "network"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "pid"},
        {"type": "mount"}, {"type": "cgroup"}]
    assert config["root"] == {"path": "rootfs"}  # writable: LinuxKit's default
    assert runtime["bindNS"]["net"] == "" and runtime["mkdir"] == []


def test_mounts_tmpfs_devices_and_runtime():
    a = load_text("""
onboot:
  - name: format
    image: linuxkit/format:v1
    mounts:
      - {type: cgroup, options: [rw]}
      - {source: mqueue}
      - {destination: /dev, options: [rw, nosuid]}
    tmpfs: [/tmp:size=10m, /run]
    devices:
      - {path: all, type: b}
      - {path: /dev/console, type: c, major: 5, minor: 1, mode: "0620"}
    runtime:
      mkdir: [/var/lib/format]
      bindNS: {net: /run/netns/format}
      interfaces: [{name: eth1, add: veth, peer: veth-format}]
""")
    config, runtime = assembly_oci.runtime_config(a.onboot[0], {}, None, {})
    mounts = {m["destination"]: m for m in config["mounts"]}
    assert list(mounts) == sorted(mounts)
    assert mounts["/sys/fs/cgroup"] == {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                                        "options": ["rw"]}
    assert mounts["/dev/mqueue"]["type"] == "mqueue"
    assert mounts["/dev"] == {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["rw", "nosuid"]}
    assert mounts["/tmp"]["options"] == ["size=10m"] and "options" not in mounts["/run"]
    assert config["linux"]["devices"] == [{"path": "/dev/console", "type": "c", "major": 5, "minor": 1,
                                           "fileMode": 0o620}]
    assert config["linux"]["resources"]["devices"] == [
        {"allow": True, "type": "b", "access": "rwm"},
        {"allow": True, "type": "c", "major": 5, "minor": 1, "access": "rwm"}]
    assert runtime["mkdir"] == ["/var/lib/format"]
    assert runtime["bindNS"]["net"] == "/run/netns/format"
    assert runtime["interfaces"] == [{"name": "eth1", "add": "veth", "peer": "veth-format", "createInRoot": False}]


def test_label_errors_name_the_label():
    a = load_text("services: [{name: s, image: redis:7}]")
    with pytest.raises(AssemblyError) as e:
        assembly_oci.runtime_config(a.services[0], {"Labels": {assembly_oci.LABEL: '{"readonly": "yes"}'}}, None, {})
    assert str(e.value) == ("label org.mobyproject.config of image 'redis:7':1:14: 'readonly' of the "
                            "label of service 's' must be a boolean; got string \"yes\"")
    with pytest.raises(AssemblyError, match="unknown key 'name'"):
        assembly_oci.runtime_config(a.services[0], {}, {"name": "x"}, {})
    with pytest.raises(AssemblyError, match=r"a.yml:1:\d+: no image entry is named 's'"):
        assembly_oci.runtime_config(load_text("services: [{name: s, image: i, uid: s}]").services[0],
                                    {}, None, {})
    with pytest.raises(AssemblyError, match="unknown capability 'CAP_BOGUS'"):
        assembly_oci.runtime_config(a.services[0], {}, {"capabilities": ["CAP_BOGUS"]}, {})


@pytest.mark.parametrize("case", sorted(p.name for p in ERRORS.iterdir() if p.is_dir()))
def test_error_case(case):
    text = (ERRORS / case / "input.yml").read_text()
    with pytest.raises(AssemblyError) as e:
        assembly.load([("input.yml", text)])
    assert rendered(e.value) == (ERRORS / case / "expected.txt").read_text()


VOLUMES = """
onboot:
  - name: test
    image: alpine:3.20
    binds:
      - /check.sh:/check.sh
      - vola:/vola:ro
    binds.add:
      - volb:/volb
    mounts:
      - type: bind
        source: vola
        destination: /mnt
        options: [ro]
volumes:
  - name: vola
    image: alpine:3.21
    readonly: true
    platforms: [linux/amd64, linux/arm64/v8]
  - name: volb
"""


def test_binds_by_volume_name_point_at_its_merged_directory():
    a = load_text(VOLUMES)
    assert a.volumes[0].readonly and a.volumes[0].platforms == ["linux/amd64", "linux/arm64/v8"]
    raw = assembly.volume_binds(a.onboot[0], a.volumes)
    assert raw["binds"] == ["/check.sh:/check.sh", "/containers/volumes/vola/merged:/vola:ro"]
    assert raw["binds.add"] == ["/containers/volumes/volb/merged:/volb"]
    assert raw["mounts"][0]["source"] == "/containers/volumes/vola/merged"
    assert a.onboot[0].raw["binds"][1] == "vola:/vola:ro"  # the model itself is left as written


@pytest.mark.parametrize("change, message", [
    ("- vola:/vola:ro", "a.yml:5:5: volume 'vola' is read-only, but onboot entry 'test' binds it "
                        "read-write (in 'binds')"),
    ("options: [ro]", "a.yml:10:5: volume 'vola' is read-only, but onboot entry 'test' binds it "
                      "read-write (in 'mounts')"),
    ("- volb:/volb", "a.yml:8:5: 'binds.add' of onboot entry 'test' binds 'volc', which is no volume; "
                     "did you mean 'volb'?"),
])
def test_volume_bind_errors(change, message):
    text = VOLUMES.replace(change, {"- vola:/vola:ro": "- vola:/vola", "options: [ro]": "options: [rw]",
                                    "- volb:/volb": "- volc:/volb"}[change])
    a = load_text(text)
    with pytest.raises(AssemblyError) as e:
        assembly.volume_binds(a.onboot[0], a.volumes)
    assert str(e.value) == message


def test_a_volume_platform_must_be_os_and_architecture():
    with pytest.raises(AssemblyError, match=r"a.yml:\d+:\d+: item 2 of 'platforms' of volume 'vola', "
                                            r'"arm64", is not a platform'):
        load_text(VOLUMES.replace("linux/arm64/v8", "arm64"))


def test_runtime_json_of_a_wireguard_style_entry():
    """interfaces created in root and moved, a namespace bound for others to join, and a
    service in another containerd namespace, as LinuxKit's wireguard example writes them."""
    a = load_text("""
onboot:
  - name: wg0
    image: linuxkit/ip:v1
    net: new
    runtime:
      interfaces:
        - name: wg0
          add: wireguard
          createInRoot: true
      bindNS:
          net: /run/netns/wg0
services:
  - name: getty
    image: linuxkit/getty:v1
    net: /run/netns/wg0
    runtime:
      namespace: tenant
""")
    ids = assembly.allocate_ids(a)
    _, rt = assembly_oci.runtime_config(a.onboot[0], {}, None, ids)
    assert rt["interfaces"] == [{"name": "wg0", "add": "wireguard", "createInRoot": True}]
    assert rt["bindNS"] == {"cgroup": "", "ipc": "", "mnt": "", "net": "/run/netns/wg0", "pid": "",
                            "user": "", "uts": ""}
    config, rt = assembly_oci.runtime_config(a.services[0], {}, None, ids)
    assert rt["namespace"] == "tenant"
    assert {"type": "network", "path": "/run/netns/wg0"} in config["linux"]["namespaces"]
