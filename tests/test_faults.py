"""Faults the machine causes, survived: a cache on a full filesystem. (Killed builds are in
test_robustness.py; registry and mirror faults in tests/formats/registry/; bench/faults
runs the long versions and counts them.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import Workspace, require

pytestmark = pytest.mark.real  # a real, small filesystem: tmpfs mounted with a size limit


@pytest.fixture
def small_fs(tmp_path):
    """A 6 MiB tmpfs; yields its mount point."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    require(p.returncode == 0, f"cannot mount a tmpfs (needs root): {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _blobs_match_their_names(cache: Path) -> int:
    from forge.digest import digest_file
    n = 0
    for blob in (cache / "cas").glob("*/*"):
        assert digest_file(blob) == blob.name.split(".")[0], blob
        n += 1
    return n


def test_a_full_cache_filesystem_is_a_clear_error_and_leaves_nothing_half_written(small_fs, tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "forge.toml").write_text("")
    ws = Workspace(root, small_fs / "cache")
    ws.write({"p/BUILD": '''
        genrule(name = "mid", outs = ["mid.bin"], cmd = "head -c 1500000 /dev/zero | tr '\\\\0' m > $@")
        genrule(name = "big", srcs = [":mid"], outs = ["big.bin"], cmd = "cat $< $< > $@")
        '''})
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (3 << 20))  # what someone else keeps on that filesystem
    r = ws.build("//p:big")
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    assert f"no space left on the filesystem of {small_fs / 'cache'}" in r.err, r.err
    assert "the action had written" in r.err and "forge cache gc" in r.err
    assert not [p for p in (small_fs / "cache/tmp").iterdir() if p.name != "procs"]
    assert _blobs_match_their_names(small_fs / "cache") >= 1  # mid.bin made it, whole
    filler.unlink()  # space freed: the next build finishes the work
    r = ws.build("//p:big")
    assert r.code == 0, r.err
    assert (root / "forge-out/p/big.bin").read_bytes() == b"m" * 3000000
    assert _blobs_match_their_names(small_fs / "cache") >= 2
    assert "1 executed, 1 cached" in r.err


def test_forge_out_on_a_full_filesystem(small_fs, tmp_path):
    """The cache has room but forge-out/ (another filesystem: outputs are copied) has not."""
    ws = Workspace(small_fs / "ws", tmp_path / "cache")
    ws.root.mkdir()
    (ws.root / "forge.toml").write_text("")
    ws.write({"p/BUILD": 'genrule(name = "big", outs = ["big.bin"], cmd = "head -c 8000000 /dev/urandom > $@")\n'})
    r = ws.build("//p:big")
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    assert "no space left on the filesystem of" in r.err and str(small_fs / "ws") in r.err, r.err
    assert not list((small_fs / "ws").rglob("*.forge-tmp-*"))


class PrivateDockerd:
    """A dockerd of the test's own (socket, data and exec roots under a temp dir, and a
    bridge of its own: with `--bridge none` dockerd deletes the host's docker0, which the
    shared engine needs), so the test can stop it without touching the engine other tests
    use."""

    def __init__(self, base: Path):
        self.base = base
        self.sock = base / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.proc = None
        self.bridge = f"fbr{os.getpid() % 100000}"

    def start(self) -> None:
        import shutil
        import time
        require(shutil.which("dockerd") is not None, "dockerd is not installed (apt-get install docker.io)")
        require(os.geteuid() == 0, "a private dockerd needs root")
        if subprocess.run(["ip", "link", "show", self.bridge], capture_output=True).returncode:
            subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
            subprocess.run(["ip", "addr", "add", "10.213.0.1/24", "dev", self.bridge], check=True)
        log = open(self.base / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--host", self.host, "--data-root", str(self.base / "root"),
             "--exec-root", str(self.base / "exec"), "--pidfile", str(self.base / "docker.pid"),
             "--bridge", self.bridge, "--iptables=false", "--ip6tables=false", "--ip-masq=false"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            p = subprocess.run(["docker", "-H", self.host, "info"], capture_output=True)
            if p.returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        pytest.fail(f"the private dockerd did not start:\n{(self.base / 'dockerd.log').read_text()[-2000:]}")

    def stop(self) -> None:
        """As `systemctl stop docker` does: SIGTERM, and the engine stops its containers."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def remove_bridge(self) -> None:
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)

    def containers(self) -> list[str]:
        return subprocess.run(["docker", "-H", self.host, "ps", "-aq"], capture_output=True,
                              text=True).stdout.split()


@pytest.fixture
def dockerd(tmp_path_factory):
    base = tmp_path_factory.mktemp("dockerd")
    d = PrivateDockerd(Path(str(base)))
    d.start()
    yield d
    d.stop()
    d.remove_bridge()
    subprocess.run(["umount", "-R", str(base / "exec")], capture_output=True)
    subprocess.run(["umount", "-R", str(base / "root")], capture_output=True)


def test_dockerd_stopped_during_run_is_a_clear_error_and_finished_stages_stay(dockerd, tmp_path):
    import shutil
    import time
    require(Path("/bin/busybox").is_file(), "busybox-static is not installed")
    root = tmp_path / "ws"
    root.mkdir()
    (root / "forge.toml").write_text("")
    ws = Workspace(root, tmp_path / "cache")
    ws.write({"s/Dockerfile": """\
        FROM scratch AS base
        COPY busybox /bin/busybox
        COPY busybox /bin/sh
        FROM base AS one
        RUN echo one > /one
        FROM one
        RUN echo two > /two
        """, "s/BUILD": 'container_image(name = "s", srcs = ["busybox"])\n'})
    shutil.copy("/bin/busybox", root / "s/busybox")
    env = {"DOCKER_HOST": dockerd.host}
    r = ws.build("//s", env=env)
    assert r.code == 0, r.err
    dockerfile = root / "s/Dockerfile"  # now only the last stage has work to do
    dockerfile.write_text(dockerfile.read_text().replace("RUN echo two", "RUN busybox sleep 15; echo two"))
    p = subprocess.Popen([os.sys.executable, "-m", "forge", "build", "//s", "--cache-dir",
                          str(ws.cache), "--progress", "plain"], cwd=root,
                         env={**os.environ, **env, "FORGE_SERVER": "0"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not dockerd.containers() and time.time() < deadline:
        time.sleep(0.2)  # until the second RUN's container exists
    assert dockerd.containers(), "the RUN never started"
    time.sleep(1)
    dockerd.stop()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert "s/Dockerfile:7" in err and "Docker engine" in err and "dockerd" in err, err
    dockerd.start()  # the engine is back
    r = ws.build("//s", env=env)
    assert r.code == 0, r.err
    ran = sorted(e["mnemonic"] for e in r.event_list if e.get("status") == "executed")
    # only the stage that was cut (the first RUN stage is cached), and the image's SBOM after it
    assert ran == ["DockerStage", "ImageSbom"], ran
    assert not dockerd.containers()  # the engine kept no container of the cut RUN


# --- registry faults, through a proxy that breaks answers on purpose ---------------------

from fault_proxy import Fault, FaultProxy  # noqa: E402
from registry_fixture import registry  # noqa: E402,F401  (fixture)


@pytest.fixture
def published(tmp_path, registry):
    """An image with a 256 KiB layer in the test registry: (registry, its digest, the layer's
    file)."""
    producer = Workspace(tmp_path / "producer", tmp_path / "producer-cache")
    producer.root.mkdir()
    (producer.root / "forge.toml").write_text("")
    payload = os.urandom(256 << 10)
    (producer.root / "img").mkdir()
    (producer.root / "img/blob.bin").write_bytes(payload)
    producer.write({"img/Dockerfile": "FROM scratch\nCOPY blob.bin /blob.bin\n", "img/BUILD": f'''
        container_image(name = "img", srcs = ["blob.bin"])
        oci_push(name = "push", image = ":img", repository = "{registry.host}/team/app", tags = ["v1"])
        '''})
    r = producer.forge("run", "//img:push")
    assert r.code == 0, r.err
    return registry, r.out.strip().split("@")[1], payload


def _consumer(tmp_path, host: str, name: str) -> Workspace:
    w = Workspace(tmp_path / name, tmp_path / f"{name}-cache")
    w.root.mkdir()
    (w.root / "forge.toml").write_text(f'[registries]\ninsecure = ["{host}"]\n')
    w.write({"p/BUILD": f'oci_pull(name = "app", image = "{host}/team/app:v1")\n'})
    return w


def _pulled_payload(w: Workspace) -> bytes:
    import tarfile
    from forge.formats.image.layout import read_image
    img = read_image(w.root / "forge-out/p/app")
    with tarfile.open(img.layers[-1][1]) as tf:
        return tf.extractfile("blob.bin").read()


# What each fault must end in: the pull retried or resumed its way to the right bytes, or
# a clear error (and then nothing was kept: the next, clean pull gets the right bytes).
REGISTRY_FAULTS = {
    "503 twice": ([Fault("status", "/manifests/", times=2, status=503)], "succeeds"),
    "429 Retry-After": ([Fault("status", "/blobs/", status=429, retry_after="1")], "succeeds"),
    "reset mid-blob": ([Fault("reset", "/blobs/")], "succeeds"),
    "truncated blob": ([Fault("truncate", "/blobs/")], "succeeds"),
    "wrong bytes": ([Fault("corrupt", "/blobs/")], "either"),
    "wrong bytes, always": ([Fault("corrupt", "/blobs/", times=99)], "fails"),
    "500 always": ([Fault("status", "/manifests/", times=99, status=500)], "fails"),
}


@pytest.mark.parametrize("case", list(REGISTRY_FAULTS))
def test_registry_faults_never_poison_the_cache_or_the_lock(published, tmp_path, case):
    import json
    import time
    registry, digest, payload = published
    faults, outcome = REGISTRY_FAULTS[case]
    proxy = FaultProxy(registry.host)
    try:
        proxy.inject(*faults)
        w = _consumer(tmp_path, proxy.host, "consumer")
        t0 = time.monotonic()
        r = w.build("//p:app")
        took = time.monotonic() - t0
        assert proxy.injected, "no fault was injected"
        assert "Traceback" not in r.err and "internal error" not in r.err, r.err
        if outcome == "succeeds" or (outcome == "either" and r.code == 0):
            assert r.code == 0, r.err
            assert _pulled_payload(w) == payload  # retried or resumed, never wrong
            if "Retry-After" in case:
                assert took >= 1.0, f"Retry-After: 1 was not honoured ({took:.2f} s)"
        else:
            # 1: the pull failed; 2: the tag could not be resolved while planning
            assert r.code in (1, 2), r.err
            assert proxy.host in r.err, r.err  # names the registry it talked to
            assert not (w.root / "forge-out/p/app").exists()
        if (w.root / "forge.lock").exists():  # a pin is only ever the verified digest
            pins = json.loads((w.root / "forge.lock").read_text())["pins"]["oci"]
            assert pins == {f"{proxy.host}/team/app:v1": digest}
        proxy.faults.clear()  # the network heals: a clean pull, same cache, gets the right bytes
        r = w.build("//p:app")
        assert r.code == 0, r.err
        assert _pulled_payload(w) == payload
    finally:
        proxy.close()


# --- Debian mirror faults ------------------------------------------------------------------

MIRROR_FAULTS = {
    "503 on InRelease": ([Fault("status", "/InRelease", status=503)], "succeeds"),
    "reset mid-Packages": ([Fault("reset", "/Packages")], "succeeds"),
    "cut .deb": ([Fault("truncate", ".deb")], "succeeds"),
    "wrong .deb bytes, always": ([Fault("corrupt", ".deb", times=99)], "fails"),
    "wrong Packages bytes, always": ([Fault("corrupt", "/Packages", times=99)], "fails"),
}


@pytest.fixture(scope="module")
def signing_keys():
    from debian_archive import Keys
    k = Keys()
    yield k
    k.close()


@pytest.mark.parametrize("case", list(MIRROR_FAULTS))
def test_mirror_faults_never_poison_the_cache_or_the_lock(tmp_path, signing_keys, case):
    import json
    from debian_archive import Server, build_archive
    from package_builders import make_deb
    deb = make_deb(tmp_path, "hello", "1.0-1")
    build_archive(tmp_path / "www", [deb], signing_keys.key("archive"))
    srv = Server(tmp_path / "www")
    proxy = FaultProxy(srv.url.split("//", 1)[1])
    faults, outcome = MIRROR_FAULTS[case]
    try:
        w = Workspace(tmp_path / "ws", tmp_path / "cache")
        w.root.mkdir()
        (w.root / "forge.toml").write_text(f'[debian]\nmirror = "http://{proxy.host}/debian"\n')
        w.write({"p/BUILD": 'deb_package(name = "hello", package = "hello", keyring = "archive.gpg")\n'})
        signing_keys.key("archive").export(w.root / "p/archive.gpg")
        proxy.inject(*faults)
        r = w.build("//p:hello")
        assert proxy.injected, "no fault was injected"
        assert "Traceback" not in r.err and "internal error" not in r.err, r.err
        if outcome == "succeeds":
            assert r.code == 0, r.err
        else:
            assert r.code == 1, r.err
            assert proxy.host in r.err, r.err
            assert not (w.root / "forge-out/p/hello.deb").exists()
        if (w.root / "forge.lock").exists():  # only what the signed Release names is pinned
            pin = json.loads(json.loads((w.root / "forge.lock").read_text())["pins"]["deb"]
                             ["bookworm/amd64/hello"])
            assert pin["SHA256"] == __import__("hashlib").sha256(deb.read_bytes()).hexdigest()
        proxy.faults.clear()
        r = w.build("//p:hello")
        assert r.code == 0, r.err
        assert (w.root / "forge-out/p/hello.deb").read_bytes() == deb.read_bytes()
    finally:
        proxy.close()
        srv.close()
