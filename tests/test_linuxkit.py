"""linuxkit_image without network or Docker: images made FROM scratch by COPY (assembled
in Python), a stand-in kernel in LinuxKit's kernel layout. Checks the fragments, the
initrd segments (with the real `cpio`), reproducibility across caches and paths, what
reruns after a one-entry change, and assembly errors. Booting is tested in
test_redisos.py."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import Workspace, require
from registry_fixture import registry  # noqa: F401  (fixture)

ASSEMBLY = """\
kernel:
  image: //kimg:kimg
  cmdline: "console=ttyS0"
init:
  - //init:image
onboot:
  - name: setup
    image: //init:image
    command: ["/bin/busybox", "true"]
    readonly: true
services:
  - name: web
    image: app
    binds.add: ["/etc:/etc:ro"]
  - name: other
    image: app
files:
  - path: etc/motd
    contents: "hi\\n"
    mode: "0644"
  - path: etc/conf
    source: conf.txt
  - path: etc/meta.json
    metadata: json
  - path: run/web
    directory: true
    uid: web
volumes:
  - name: data
"""

BUILD = """\
linuxkit_image(
    name = "os",
    assembly = "os.yml",
    images = {"app": "//app:app"},
    formats = ["kernel+initrd", "tar"],
)
"""


ALL_FORMATS = ("kernel+initrd", "tar", "iso-bios", "iso-efi", "raw-bios", "raw-efi",
               "qcow2-bios", "qcow2-efi", "tar-kernel-initrd", "iso-efi-initrd", "aws", "gcp",
               "vhd", "vmdk")  # and dynamic-vhd, which writes N.vhd too: another target


def _kernel_tar() -> bytes:
    import io
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for d in ("lib", "lib/modules", "lib/modules/6.1.0-test"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            t.addfile(ti)
    return buf.getvalue()


def make_workspace(root: Path, cache: Path) -> Workspace:
    root.mkdir(parents=True)
    (root / "forge.toml").write_text("")
    w = Workspace(root, cache)
    w.write({
        "kimg/Dockerfile": "FROM scratch\nCOPY kernel kernel.tar /\n",
        "kimg/BUILD": 'container_image(name = "kimg", srcs = ["kernel", "kernel.tar"])\n',
        "init/Dockerfile": "FROM scratch\nCOPY busybox /bin/busybox\nCOPY init /init\n",
        "init/BUILD": 'container_image(name = "image", srcs = ["busybox", "init"])\n',
        "init/init": "#!/bin/busybox sh\necho hi\n",
        "app/hello.txt": "hello\n",
        "app/Dockerfile": "FROM scratch\nCOPY hello.txt /srv/hello.txt\n"
                          "LABEL org.mobyproject.config='{\"capabilities\": [\"CAP_NET_BIND_SERVICE\"], "
                          "\"binds\": [\"/var:/var\"]}'\nCMD [\"/bin/serve\", \"--port\", \"80\"]\n",
        "app/BUILD": 'container_image(name = "app", srcs = ["hello.txt"])\n',
        "os.yml": ASSEMBLY,
        "conf.txt": "conf\n",
        "BUILD": BUILD,
    })
    (root / "kimg/kernel").write_bytes(b"\0FAKEKERNEL" * 100)
    (root / "kimg/kernel.tar").write_bytes(_kernel_tar())
    shutil.copy("/bin/busybox", root / "init/busybox")
    return w


@pytest.fixture
def lk(tmp_path):
    require(Path("/bin/busybox").is_file(), "busybox-static is not installed (apt-get install busybox-static)")
    return make_workspace(tmp_path / "ws", tmp_path / "cache")


def _tar_members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as t:
        return {m.name: m for m in t.getmembers()}


def test_fragments_and_bundles(lk):
    r = lk.build("//:os")
    assert r.code == 0, r.err
    tar = lk.root / "forge-out/os.tar"
    m = _tar_members(tar)
    assert m["boot/kernel"].size == 1100 and m["boot/cmdline"].size == len("console=ttyS0")
    # read-only entry: image in rootfs/; writable (LinuxKit's default): lower/ + empty rootfs/
    assert "containers/onboot/000-setup/rootfs/bin/busybox" in m
    assert "containers/services/web/lower/srv/hello.txt" in m
    assert m["containers/services/web/rootfs"].isdir()
    assert "containers/services/web/lower/proc" in m  # mount points runc needs
    assert "containers/volumes/data" in m
    assert m["etc/conf"].mode == 0o600 and m["etc/motd"].mode == 0o644
    assert m["run/web"].isdir() and m["run/web"].uid == 101 and m["run/web"].mode == 0o700
    assert {x.mtime for x in m.values()} == {315532800}
    with tarfile.open(tar) as t:
        cfg = json.load(t.extractfile("containers/services/web/config.json"))
        meta = json.load(t.extractfile("etc/meta.json"))
    assert cfg["process"]["args"] == ["/bin/serve", "--port", "80"]
    assert cfg["process"]["capabilities"]["bounding"] == ["CAP_NET_BIND_SERVICE"]
    binds = [(x["destination"], x["options"]) for x in cfg["mounts"] if x["type"] == "bind"]
    assert ("/etc", ["rbind", "rprivate", "ro"]) in binds or any(d == "/etc" for d, _ in binds)
    assert any(d == "/var" for d, _ in binds)  # from the label, kept by binds.add
    assert "root" in cfg and "readonly" not in cfg["root"]
    assert [e["name"] for e in meta["services"]] == ["web", "other"]


def test_segments_unpack_with_cpio(lk):
    require(shutil.which("cpio") is not None, "cpio is not installed (apt-get install cpio)")
    assert lk.build("//:os").code == 0
    segs = sorted((lk.root / "forge-out/os.initrd").iterdir())
    names = [s.name for s in segs]
    assert names == ["000-kernel.cpio.gz", "001-init-0.cpio.gz", "002-onboot-setup.cpio.gz",
                     "003-services-web.cpio.gz", "004-services-other.cpio.gz",
                     "005-volumes-data.cpio.gz", "006-files.cpio.gz", "007-sbom.cpio.gz"]
    listing = {}
    for s in segs:
        p = subprocess.run(["cpio", "-itv", "--quiet"], input=gzip.decompress(s.read_bytes()),
                           capture_output=True, check=True)
        listing[s.name] = p.stdout.decode().splitlines()
    base = listing["000-kernel.cpio.gz"]
    assert any(ln.startswith("crw") and ln.endswith(" dev/console") for ln in base)
    assert any(ln.endswith(" etc/forge/modules.load") for ln in base)
    web = [ln.split()[-1] for ln in listing["003-services-web.cpio.gz"]]
    assert web[:3] == ["containers", "containers/services", "containers/services/web"]
    assert "containers/services/web/config.json" in web
    # later segments carry no console of their own
    assert not any("dev/console" in ln for ln in listing["003-services-web.cpio.gz"])
    initrd = (lk.root / "forge-out/os-initrd.img").read_bytes()
    assert initrd == b"".join(s.read_bytes() for s in segs)  # gzip members need no padding


def test_two_clean_builds_are_byte_identical(tmp_path):
    require(Path("/bin/busybox").is_file(), "busybox-static is not installed")
    for tool in ("xorriso", "mkfs.vfat", "mcopy", "syslinux", "grub-mkimage", "qemu-img", "sfdisk"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (see dev/setup.sh)")
    every = BUILD.replace('["kernel+initrd", "tar"]', repr(list(ALL_FORMATS)).replace("'", '"'))
    every += BUILD.replace('"os"', '"dyn"').replace('["kernel+initrd", "tar"]', '["dynamic-vhd"]')
    a = make_workspace(tmp_path / "one" / "ws", tmp_path / "cache1")
    b = make_workspace(tmp_path / "two" / "elsewhere", tmp_path / "cache2")
    for w, umask in ((a, 0o022), (b, 0o077)):  # the umask reaches neither modes nor bytes
        (w.root / "BUILD").write_text(every)
        old = os.umask(umask)
        try:
            r = w.build("//:os", "//:dyn")
        finally:
            os.umask(old)
        assert r.code == 0, r.err
    names = ["os-kernel", "os-initrd.img", "os-cmdline", "os.tar", "os.iso", "os-efi.iso",
             "os-bios.img", "os-efi.img", "os.qcow2", "os-efi.qcow2", "os-initrd.tar",
             "os-efi-initrd.iso", "os.raw", "os.img.tar.gz", "os.vhd", "os.vmdk", "dyn.vhd"]
    for name in names:
        assert (a.root / "forge-out" / name).read_bytes() == (b.root / "forge-out" / name).read_bytes(), name


def _executed(r) -> list[tuple[str, str]]:
    return sorted((e["mnemonic"], Path(e["outputs"][0]).name) for e in r.event_list
                  if e.get("status") == "executed")


def test_changing_one_service_reruns_only_its_fragment(lk):
    assert lk.build("//:os").code == 0
    text = (lk.root / "os.yml").read_text()
    (lk.root / "os.yml").write_text(text.replace('binds.add: ["/etc:/etc:ro"]',
                                                 'binds.add: ["/etc:/etc:ro"]\n    env: ["A=1"]'))
    r = lk.build("//:os")
    assert r.code == 0, r.err
    # etc/meta.json holds the assembly (`metadata: json`), so the files fragment changes too
    # and so does the SBOM, which lists the files, and its segment
    assert _executed(r) == [("LkBundle", "services-000-web.tar"), ("LkFiles", "files.tar"),
                            ("LkInitrd", "os-initrd.img"), ("LkSbom", "os.sbom.spdx.json"),
                            ("LkSegment", "003-services-web.cpio.gz"),
                            ("LkSegment", "006-files.cpio.gz"), ("LkSegment", "007-sbom.cpio.gz"),
                            ("LkTar", "os.tar")]
    assert lk.build("//:os").event_list[-1]["executed"] == 0


def test_zstd_segments(lk):
    require(shutil.which("zstd") is not None, "zstd is not installed (apt-get install zstd)")
    (lk.root / "BUILD").write_text(BUILD.replace('formats', 'compression = "zstd",\n    formats'))
    assert lk.build("//:os").code == 0
    seg = lk.root / "forge-out/os.initrd/003-services-web.cpio.zst"
    p = subprocess.run(["zstd", "-dc", str(seg)], capture_output=True, check=True)
    assert p.stdout.startswith(b"070701")
    # Another zstandard (here: the same one claiming another version) means other keys:
    # every segment is compressed again, never served from the cache made by the first.
    site = lk.root.parent / "other-zstandard"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import zstandard\nzstandard.__version__ = '0.0.0+other'\n")
    r = lk.build("//:os", env={"PYTHONPATH": str(site)})
    assert r.code == 0, r.err
    ran = _executed(r)
    assert [n for m, n in ran if m == "LkSegment"] == sorted(
        x.name for x in (lk.root / "forge-out/os.initrd").iterdir()), ran
    assert {m for m, _ in ran} <= {"LkSegment", "LkInitrd"}, ran
    # Another zlib: the gzip layers are written again (same bytes here, so it stops there)
    (site / "sitecustomize.py").write_text("import zlib\nzlib.ZLIB_RUNTIME_VERSION = '0.0+other'\n")
    r = lk.build("//:os", env={"PYTHONPATH": str(site)})
    assert r.code == 0, r.err
    ran = _executed(r)
    assert {m for m, _ in ran} == {"CopyLayer"}, ran


def test_a_step_refuses_a_compressor_other_than_its_key_names():
    from forge.formats.common.compression import compressor_id, compressor_mismatch
    assert compressor_mismatch(compressor_id("zstd"), "zstd") is None
    assert compressor_id("gzip").startswith("zlib ") and "libzstd" in compressor_id("zstd")
    assert "planned to compress with zstandard 0.1" in compressor_mismatch(
        "zstandard 0.1 (libzstd 1.0.0)", "zstd")


@pytest.mark.parametrize("change, message", [
    ("    binds.add", "os.yml:14:16: error: 'binds.add' of service 'web' must be a list of strings"),
    ("  - name: web", None),
])
def test_nobuild_reports_assembly_errors_at_their_line(lk, change, message):
    text = (lk.root / "os.yml").read_text()
    if change == "  - name: web":
        text = text.replace("    image: app\n    binds.add", "    imgae: app\n    binds.add")
        message = "os.yml:13:5: error: unknown key 'imgae' in service 'web'; did you mean 'image'?"
    else:
        text = text.replace('    binds.add: ["/etc:/etc:ro"]', "    binds.add: 7")
    (lk.root / "os.yml").write_text(text)
    r = lk.forge("build", "--nobuild", "//:os")
    assert r.code != 0
    assert message in r.err, r.err
    assert "Traceback" not in r.err


def test_nobuild_runs_nothing(lk):
    r = lk.build("--nobuild", "//:os")
    assert r.code == 0, r.err
    assert not any(e.get("status") == "executed" for e in r.event_list)
    assert not (lk.root / "forge-out/os.tar").exists()


def test_unknown_label_in_assembly_names_the_yaml_line(lk):
    text = (lk.root / "os.yml").read_text().replace("  - //init:image", "  - //init:imagex")
    (lk.root / "os.yml").write_text(text)
    r = lk.forge("build", "--nobuild", "//:os")
    assert r.code != 0
    assert "os.yml:5:" in r.err and "'//init:imagex' names no target" in r.err, r.err
    assert "did you mean" in r.err or "image" in r.err


def test_unknown_format_is_an_error(lk):
    (lk.root / "BUILD").write_text(BUILD.replace('"tar"', '"isobios"'))
    r = lk.forge("build", "--nobuild", "//:os")
    assert r.code != 0 and "unknown format 'isobios'" in r.err and "iso-bios" in r.err, r.err


def test_nobuild_plans_registry_images_without_the_network(lk):
    # Nothing listens on port 1: resolving the tag would fail, so passing proves no fetch.
    text = (lk.root / "os.yml").read_text().replace("    image: app\n    binds.add",
                                                    "    image: 127.0.0.1:1/team/web:1.0\n    binds.add")
    (lk.root / "os.yml").write_text(text)
    r = lk.forge("build", "--nobuild", "//:os")
    assert r.code == 0, r.err
    assert not (lk.root / "forge.lock").exists()
    r = lk.forge("build", "//:os", "--offline")
    assert r.code != 0 and "127.0.0.1:1/team/web:1.0" in r.err and "not pinned" in r.err, r.err


@pytest.mark.real
def test_a_registry_reference_is_pulled_and_pinned(lk, registry):  # noqa: F811
    from test_pull import publish
    digest = publish(lk, registry, "from the registry\n")
    text = (lk.root / "os.yml").read_text().replace(
        "  - name: other\n    image: app", f"  - name: other\n    image: {registry.host}/team/app:v1")
    (lk.root / "os.yml").write_text(text)
    r = lk.build("//:os")
    assert r.code == 0, r.err
    lock = json.loads((lk.root / "forge.lock").read_text())
    assert lock["pins"]["oci"][f"{registry.host}/team/app:v1"] == digest
    with tarfile.open(lk.root / "forge-out/os.tar") as t:
        assert t.extractfile("containers/services/other/lower/a.txt").read() == b"from the registry\n"


def test_each_image_is_unpacked_once_and_ucode_goes_first(lk):
    # the init image serves `init` and the onboot entry; app serves two services
    import io
    ucode = io.BytesIO()
    from forge.formats.linux import cpio
    w = cpio.CpioWriter(ucode, mtime=0)
    w.add_dir("kernel")
    w.add_file("kernel/x86/microcode/GenuineIntel.bin", b"UCODE")
    w.close()
    (lk.root / "kimg/ucode.cpio").write_bytes(ucode.getvalue())
    (lk.root / "kimg/Dockerfile").write_text("FROM scratch\nCOPY kernel kernel.tar ucode.cpio /\n")
    (lk.root / "kimg/BUILD").write_text(
        'container_image(name = "kimg", srcs = ["kernel", "kernel.tar", "ucode.cpio"])\n')
    text = (lk.root / "os.yml").read_text().replace('  cmdline: "console=ttyS0"',
                                                     '  cmdline: "console=ttyS0"\n  ucode: ucode.cpio')
    (lk.root / "os.yml").write_text(text)
    r = lk.build("//:os")
    assert r.code == 0, r.err
    assert sum(e.get("mnemonic") == "LkUnpack" and e["status"] == "executed" for e in r.event_list) == 2
    initrd = (lk.root / "forge-out/os-initrd.img").read_bytes()
    assert initrd.startswith(ucode.getvalue())  # uncompressed, first
    with tarfile.open(lk.root / "forge-out/os.tar") as t:
        assert t.extractfile("boot/ucode.cpio").read() == ucode.getvalue()


def test_a_kernel_from_a_url_with_its_sha256(lk):
    import hashlib
    kernel = lk.root / "kimg/kernel"
    sha = hashlib.sha256(kernel.read_bytes()).hexdigest()
    (lk.root / "BUILD").write_text(BUILD + f'kernel(name = "k", url = "file://{kernel}", sha256 = "{sha}")\n')
    (lk.root / "os.yml").write_text((lk.root / "os.yml").read_text().replace("//kimg:kimg", "//:k"))
    r = lk.build("//:os")
    assert r.code == 0, r.err
    assert (lk.root / "forge-out/os-kernel").read_bytes() == kernel.read_bytes()
    (lk.root / "BUILD").write_text(BUILD + f'kernel(name = "k", url = "file://{kernel}", sha256 = "{"0" * 64}")\n')
    r = lk.build("//:os")
    assert r.code == 1 and "sha256" in r.err, r.err


def _mnemonics(r) -> list[str]:
    return sorted(e["mnemonic"] for e in r.event_list if e.get("status") == "executed")


def _with_source(lk, source: str, optional: bool = False) -> None:
    extra = "\n    optional: true" if optional else ""
    text = (lk.root / "os.yml").read_text().replace("    source: conf.txt", f"    source: {source}{extra}")
    (lk.root / "os.yml").write_text(text)


def _files_tar(lk) -> dict[str, bytes]:
    with tarfile.open(lk.root / "forge-out/os.rootfs/files.tar") as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


@pytest.mark.parametrize("source", ["~/.ssh/id_rsa.pub", "ABS", "../outside/key.pub"])
def test_a_file_source_outside_the_workspace_is_read_and_rebuilds(lk, tmp_path, source):
    home = tmp_path / "home"
    key = home / ".ssh/id_rsa.pub" if source.startswith("~") else tmp_path / "outside/key.pub"
    key.parent.mkdir(parents=True)
    key.write_text("ssh-ed25519 AAAA one\n")
    _with_source(lk, str(key) if source == "ABS" else source)
    env = {"HOME": str(home)}
    r = lk.build("//:os", env=env)
    assert r.code == 0, r.err
    assert _files_tar(lk)["etc/conf"] == b"ssh-ed25519 AAAA one\n"
    warnings = [x for x in r.err.splitlines() if x.startswith("WARNING:")]
    assert len(warnings) == 1 and str(key) in warnings[0] and "//:os" in warnings[0] \
        and "remote cache" in warnings[0], r.err
    # Same size, new content: the cached plan must notice, and LkFiles must rerun.
    key.write_text("ssh-ed25519 AAAA two\n")
    r = lk.build("//:os", env=env)
    assert r.code == 0, r.err
    assert "LkFiles" in _mnemonics(r) and _files_tar(lk)["etc/conf"] == b"ssh-ed25519 AAAA two\n"
    r = lk.build("//:os", env=env)  # and the warning comes with every build, from the cached plan
    assert r.code == 0 and lk.executed(r) == [] and str(key) in r.err, r.err


def test_a_missing_optional_source_is_skipped_until_it_appears(lk, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    _with_source(lk, "~/.ssh/id_rsa.pub", optional=True)
    env = {"HOME": str(home)}
    r = lk.build("//:os", env=env)
    assert r.code == 0, r.err
    assert "etc/conf" not in _files_tar(lk) and "etc/motd" in _files_tar(lk)
    assert "WARNING" not in r.err  # nothing was read from outside
    (home / ".ssh").mkdir()  # the directory of the missing file's nearest parent changes
    (home / ".ssh/id_rsa.pub").write_text("key\n")
    r = lk.build("//:os", env=env)
    assert r.code == 0, r.err
    assert _files_tar(lk)["etc/conf"] == b"key\n"


@pytest.mark.parametrize("source", ["~/.ssh/none.pub", "/nonexistent/key", "missing.txt"])
def test_a_missing_source_that_is_not_optional_names_the_yaml_line(lk, tmp_path, source):
    _with_source(lk, source)
    r = lk.forge("build", "--nobuild", "//:os", env={"HOME": str(tmp_path)})
    assert r.code == 1, r.err
    assert "os.yml:22:5: error: file 'etc/conf': source " + source in r.err and "optional: true" in r.err, r.err
    assert "Traceback" not in r.err


def test_a_file_entry_as_linuxkit_writes_it(lk):
    """LinuxKit's file rules: a leading / is dropped, mode is octal (0600, 0700 for a
    directory), uid/gid by number or entry name."""
    text = (lk.root / "os.yml").read_text().replace("  - path: etc/motd", "  - path: /etc/motd")
    (lk.root / "os.yml").write_text(text)
    r = lk.build("//:os")
    assert r.code == 0, r.err
    m = _tar_members(lk.root / "forge-out/os.rootfs/files.tar")
    assert m["etc/motd"].mode == 0o644 and m["etc/conf"].mode == 0o600
    assert m["run/web"].isdir() and m["run/web"].mode == 0o700 and m["run/web"].uid == 101
    # leading directories: the first entry below one makes it, with its mode plus x, its ids
    assert m["etc"].mode == 0o755 and m["run"].mode == 0o700 and m["run"].uid == 101


NO_KERNEL = """\
init:
  - //init:image
services:
  - name: web
    image: app
"""


def test_an_assembly_without_a_kernel_builds_tar(lk):
    (lk.root / "os.yml").write_text(NO_KERNEL)
    (lk.root / "BUILD").write_text(BUILD.replace('["kernel+initrd", "tar"]', '["tar"]'))
    r = lk.build("//:os")
    assert r.code == 0, r.err
    names = _tar_members(lk.root / "forge-out/os.tar")
    assert "containers/services/web/config.json" in names and "init" in names
    assert not any(n.startswith("boot/") for n in names)
    assert not any("Kernel" in m for m in _mnemonics(r))
    r = lk.forge("run", "//:os")
    assert r.code == 2 and "builds no format forge run can boot (it builds: tar)" in r.err, r.err


def test_a_format_that_needs_a_kernel_names_the_format_and_the_assembly(lk):
    (lk.root / "os.yml").write_text(NO_KERNEL)
    r = lk.forge("build", "--nobuild", "//:os")
    assert r.code != 0 and "Traceback" not in r.err
    assert "format 'kernel+initrd' needs a kernel, and the assembly os.yml has no `kernel.image`" in r.err, r.err
    assert "BUILD:5:" in r.err and "build only tar" in r.err, r.err


def test_fragments_keep_dotfiles_at_the_root(tmp_path):
    import io
    from forge.formats.linux.fragments import FragmentWriter
    src = io.BytesIO()
    with tarfile.open(fileobj=src, mode="w") as t:
        for name in ("./.profile", "./etc/.hidden"):
            ti = tarfile.TarInfo(name)
            ti.size = 1
            t.addfile(ti, io.BytesIO(b"x"))
    src.seek(0)
    out = io.BytesIO()
    with tarfile.open(fileobj=src) as tf, FragmentWriter(out, mtime=0) as w:
        w.copy_tree(tf, "containers/x/rootfs", drop=[".dockerenv"])
    out.seek(0)
    with tarfile.open(fileobj=out) as t:
        names = t.getnames()
    assert "containers/x/rootfs/.profile" in names and "containers/x/rootfs/etc/.hidden" in names


def _evil_image_archive(path: Path, member: str) -> str:
    """An OCI layout tarball whose one layer holds `member` (e.g. a `../` path); returns
    the layer's digest."""
    import hashlib
    import io
    from forge.formats.image.layout import add_blob, image_config_defaults, init_layout, write_image
    from forge.formats.image.spec import OCI_LAYER, LayerInfo
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo(member)
        ti.size = 5
        t.addfile(ti, io.BytesIO(b"evil\n"))
    data = buf.getvalue()
    layout = path.with_suffix(".d")
    init_layout(layout)
    desc = add_blob(layout, data, OCI_LAYER)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    write_image(layout, image_config_defaults(diff_ids=[digest]),
                [LayerInfo(desc.digest, desc.size, digest, OCI_LAYER)])
    with tarfile.open(path, "w") as t:
        for f in sorted(layout.rglob("*")):
            t.add(f, f.relative_to(layout).as_posix(), recursive=False)
    return digest


def test_an_init_image_with_an_escaping_layer_is_bad_input(lk):
    digest = _evil_image_archive(lk.root / "init/evil.tar", "../../escaped")
    (lk.root / "init/BUILD").write_text(
        'container_image(name = "image", srcs = ["busybox", "init"])\n'
        'oci_archive(name = "evil", src = "evil.tar")\n')
    (lk.root / "os.yml").write_text(ASSEMBLY.replace("  - //init:image\n", "  - //init:evil\n", 1))
    r = lk.build("//:os")
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    assert "//init:evil" in r.err and digest in r.err and "../../escaped" in r.err, r.err
    assert not list(lk.root.parent.rglob("escaped"))


def test_copy_from_an_image_with_an_escaping_layer_is_bad_input(lk):
    digest = _evil_image_archive(lk.root / "init/evil.tar", "a/../../../escaped")
    lk.write({"init/BUILD": 'oci_archive(name = "evil", src = "evil.tar")\n',
              "c/Dockerfile": "FROM scratch\nCOPY --from=evil /escaped /x\n",
              "c/BUILD": 'container_image(name = "c", bases = {"evil": "//init:evil"})\n'})
    r = lk.build("//c")
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    assert "//c:c" in r.err and digest in r.err and "a/../../../escaped" in r.err, r.err
    assert not list(lk.root.parent.rglob("escaped"))


# LinuxKit's test-case style: a base with the kernel and init, and a test file without a
# kernel built after it (`linuxkit build common.yml test.yml`), using volumes by name, a
# read-only volume, runtime interfaces/bindNS/namespace and an optional key from ~/.
COMMON = """\
kernel:
  image: //kimg:kimg
  cmdline: "console=ttyS0"
init:
  - //init:image
"""
TEST_CASE = """\
onboot:
  - name: wg0
    image: //init:image
    net: new
    binds:
      - vola:/vola:ro
    mounts:
      - type: bind
        source: volb
        destination: /volb
    runtime:
      interfaces:
        - name: wg0
          add: wireguard
          createInRoot: true
      bindNS:
          net: /run/netns/wg0
services:
  - name: web
    image: app
    net: /run/netns/wg0
    binds.add:
      - volb:/data
    runtime:
      namespace: tenant
volumes:
  - name: vola
    image: app
    format: filesystem
    readonly: true
  - name: volb
files:
  - path: root/.ssh/authorized_keys
    source: ~/.ssh/id_rsa.pub
    mode: "0600"
    optional: true
"""


def test_a_linuxkit_style_test_case_builds(lk, tmp_path):
    lk.write({"common.yml": COMMON, "test.yml": TEST_CASE, "BUILD": BUILD.replace(
        'assembly = "os.yml",', 'assembly = "common.yml",\n    overlays = ["test.yml"],')})
    r = lk.build("//:os", env={"HOME": str(tmp_path)})
    assert r.code == 0, r.err
    with tarfile.open(lk.root / "forge-out/os.tar") as t:
        names = set(t.getnames())
        wg0 = json.loads(t.extractfile("containers/onboot/000-wg0/config.json").read())
        rt = json.loads(t.extractfile("containers/onboot/000-wg0/runtime.json").read())
        web = json.loads(t.extractfile("containers/services/web/config.json").read())
        web_rt = json.loads(t.extractfile("containers/services/web/runtime.json").read())
    assert {"containers/volumes/vola/lower/srv/hello.txt", "containers/volumes/vola/merged",
            "containers/volumes/volb/lower", "containers/volumes/volb/merged",
            "containers/volumes/volb/tmp"} <= names
    assert "containers/volumes/vola/tmp" not in names  # read-only: no tmpfs, no overlay
    assert "root/.ssh/authorized_keys" not in names  # optional, and not in this HOME
    mounts = {m["destination"]: m["source"] for m in wg0["mounts"]}
    assert mounts["/vola"] == "/containers/volumes/vola/merged" and mounts["/volb"] == "/containers/volumes/volb/merged"
    assert {m["destination"]: m["source"] for m in web["mounts"]}["/data"] == "/containers/volumes/volb/merged"
    assert rt["interfaces"] == [{"name": "wg0", "add": "wireguard", "createInRoot": True}]
    assert rt["bindNS"]["net"] == "/run/netns/wg0" and web_rt["namespace"] == "tenant"
    assert {"type": "network", "path": "/run/netns/wg0"} in web["linux"]["namespaces"]


def test_a_read_only_volume_bound_read_write_is_an_error(lk):
    lk.write({"common.yml": COMMON, "test.yml": TEST_CASE.replace("vola:/vola:ro", "vola:/vola"),
              "BUILD": BUILD.replace('assembly = "os.yml",', 'assembly = "common.yml",\n    overlays = ["test.yml"],')})
    r = lk.forge("build", "--nobuild", "//:os")
    assert r.code == 2 and "test.yml:5:5: error: volume 'vola' is read-only, but onboot entry 'wg0' " \
        "binds it read-write (in 'binds')" in r.err and "add :ro" in r.err, r.err


def test_volume_platforms_need_a_registry_reference(lk):
    lk.write({"common.yml": COMMON, "test.yml": TEST_CASE.replace(
        "    format: filesystem\n", "    platforms: [linux/amd64, linux/arm64]\n"),
        "BUILD": BUILD.replace('assembly = "os.yml",', 'assembly = "common.yml",\n    overlays = ["test.yml"],')})
    r = lk.forge("build", "--nobuild", "//:os")
    assert r.code == 2 and "volume 'vola' asks for platforms linux/amd64, linux/arm64, but 'app' is a " \
        "forge target" in r.err, r.err
    # A registry reference is pulled once per platform (planned here with placeholders).
    text = (lk.root / "test.yml").read_text().replace("  - name: vola\n    image: app", "  - name: vola\n    image: 127.0.0.1:1/lib/alpine:3")
    import re
    planned = []
    for platforms in ("[linux/amd64, linux/arm64]", "[linux/amd64]"):
        (lk.root / "test.yml").write_text(text.replace("[linux/amd64, linux/arm64]", platforms))
        r = lk.forge("build", "--nobuild", "//:os")
        assert r.code == 0, r.err
        planned.append(int(re.search(r"(\d+) actions planned", r.err).group(1)))
    assert planned[0] == planned[1] + 1  # one pull per platform
