"""The Debian rules trust only what a trusted key signed: deb_package, kernel and
debian_rootfs against an archive made and signed inside the test, served on loopback."""

from __future__ import annotations

import json
import shutil
import time
from email.utils import formatdate

import pytest

from conftest import require
from debian_archive import Keys, Server, build_archive
from package_builders import make_deb
from forge.formats.debian.archive import fetch_index, resolve
from forge.workspace import Workspace as ForgeWorkspace, load_config

pytestmark = pytest.mark.real  # gpg, gpgv, dpkg-scanpackages, apt-ftparchive

BUILD = 'deb_package(name = "hello", package = "hello", keyring = "archive.gpg")\n'


@pytest.fixture(scope="module")
def keys():
    k = Keys()
    yield k
    k.close()


@pytest.fixture
def mirror(tmp_path, keys, ws):
    """Serves tmp/www; the workspace's forge.toml names it. Returns (url, www)."""
    srv = Server(tmp_path / "www")
    url = srv.url + "/debian"
    (ws.root / "forge.toml").write_text(f'[debian]\nmirror = "{url}"\n')
    ws.write({"p/BUILD": BUILD})
    keys.key("archive").export(ws.root / "p/archive.gpg")
    yield url, tmp_path / "www"
    srv.close()


def _debs(tmp_path):
    return [make_deb(tmp_path, "hello", "1.0-1")]


def _analyse(root, label):
    from forge.analysis import Analyzer
    from forge.labels import parse_pattern
    an = Analyzer(ForgeWorkspace(root, load_config(root / "forge.toml")))
    return an.analyze(an.expand([parse_pattern(label)]))


def _assert_user_error(r):
    assert r.code == 1, (r.code, r.err)
    assert "Traceback" not in r.err and "internal error" not in r.err


def test_verified_suite_is_pinned_and_its_keys_are_in_the_fetch_key(ws, mirror, keys, tmp_path):
    url, www = mirror
    build_archive(www, _debs(tmp_path), keys.key("archive"))
    r = ws.build("//p:hello")
    assert r.code == 0, r.err
    pins = json.loads((ws.root / "forge.lock").read_text())["pins"]["deb"]
    assert json.loads(pins["bookworm/amd64/hello"])["Version"] == "1.0-1"
    fetch = next(a for a in _analyse(ws.root, "//p:hello").actions if a.mnemonic == "DebFetch")
    assert fetch.params["trusted_keys"] == [keys.key("archive").fingerprint]


def test_unknown_key_fails_and_pins_nothing(ws, mirror, keys, tmp_path):
    url, www = mirror
    stranger = keys.key("stranger")
    build_archive(www, _debs(tmp_path), stranger)
    r = ws.build("//p:hello")
    _assert_user_error(r)
    assert "suite bookworm" in r.err and url in r.err and stranger.fingerprint in r.err
    assert "p/archive.gpg (keyring of //p:hello)" in r.err
    assert 'keyring = "<label or /path>"' in r.err and "debian-archive-keyring" in r.err
    assert not (ws.root / "forge.lock").exists()
    assert not (ws.root / "forge-out").exists()


def test_expired_release_fails_naming_the_date(ws, mirror, keys, tmp_path):
    url, www = mirror
    past = formatdate(time.time() - 86400, usegmt=True)
    build_archive(www, _debs(tmp_path), keys.key("archive"), extra_fields=f"Valid-Until: {past}")
    r = ws.build("//p:hello")
    _assert_user_error(r)
    assert f"expired on {past}" in r.err and url in r.err and keys.key("archive").fingerprint in r.err
    assert not (ws.root / "forge.lock").exists()


def test_tampered_packages_index_is_bad_input_not_a_bug(ws, mirror, keys, tmp_path):
    import hashlib
    import lzma
    url, www = mirror
    archive = build_archive(www, _debs(tmp_path), keys.key("archive"))
    index = archive / "dists/bookworm/main/binary-amd64/Packages.xz"
    signed = hashlib.sha256(index.read_bytes()).hexdigest()
    index.write_bytes(lzma.compress(b"Package: hello\nVersion: 9\nFilename: pool/evil.deb\n"))
    r = ws.build("//p:hello")
    _assert_user_error(r)
    assert "dists/bookworm/main/binary-amd64/Packages.xz" in r.err and url in r.err
    assert signed in r.err and hashlib.sha256(index.read_bytes()).hexdigest() in r.err
    assert not (ws.root / "forge.lock").exists()


def test_tampered_deb_fails_naming_the_mirror_and_caches_nothing(ws, mirror, keys, tmp_path):
    url, www = mirror
    archive = build_archive(www, _debs(tmp_path), keys.key("archive"))
    entry = resolve(fetch_index(url, "bookworm", keyrings=[ws.root / "p/archive.gpg"]), "hello")
    served = archive / entry["Filename"]
    served.write_bytes(served.read_bytes()[:-1] + b"X")
    r = ws.build("//p:hello")
    _assert_user_error(r)
    assert entry["Filename"] in r.err and f"mirror {url}" in r.err and entry["SHA256"] in r.err
    assert not (ws.root / "forge-out/p/hello.deb").exists()
    shutil.copy(tmp_path / "hello_1.0-1_xz.deb", served)  # the mirror heals: nothing stale was kept
    assert ws.build("//p:hello").code == 0


def test_keyring_from_forge_toml_and_what_changes_the_fetch_key(ws, mirror, keys, tmp_path):
    url, www = mirror
    key = keys.key("archive")
    build_archive(www, _debs(tmp_path), key)
    ws.write({"p/BUILD": 'deb_package(name = "hello", package = "hello")\n'})
    (ws.root / "keys").mkdir()
    key.export(ws.root / "keys/company.gpg")
    with open(ws.root / "forge.toml", "a") as f:
        f.write('keyring = "keys/company.gpg"\n')
    assert ws.build("//p:hello").code == 0
    # the same key, armoured: the same fingerprints, so nothing is fetched again
    key.export(ws.root / "keys/company.gpg", armor=True)
    r = ws.build("//p:hello")
    assert r.code == 0 and r.err.strip().endswith("0 executed, 1 cached"), r.err
    # one more trusted key: the fetch is another action
    (ws.root / "keys/company.gpg").write_bytes(
        key.export(tmp_path / "a.gpg").read_bytes() + keys.key("stranger").export(tmp_path / "s.gpg").read_bytes())
    r = ws.build("//p:hello")
    assert r.code == 0 and r.err.strip().endswith("1 executed, 0 cached"), r.err


def test_insecure_is_an_explicit_opt_out_warned_on_every_build(ws, mirror, tmp_path):
    url, www = mirror
    build_archive(www, _debs(tmp_path), None)  # unsigned
    ws.write({"p/BUILD": 'deb_package(name = "hello", package = "hello")\n'})
    r = ws.build("//p:hello")
    _assert_user_error(r)
    assert "unsigned" in r.err and "[debian] insecure = true" in r.err  # the hint names it
    with open(ws.root / "forge.toml", "a") as f:
        f.write("insecure = true\n")
    for _ in range(2):  # built, then cached: both warn
        r = ws.build("//p:hello")
        assert r.code == 0, r.err
        assert "WARNING: [debian] insecure = true in forge.toml: Debian Release signatures are NOT verified" in r.err
    fetch = next(a for a in _analyse(ws.root, "//p:hello").actions if a.mnemonic == "DebFetch")
    assert fetch.params["insecure"] is True and fetch.params["trusted_keys"] == []


def test_insecure_must_be_a_boolean(ws):
    (ws.root / "forge.toml").write_text('[debian]\ninsecure = "yes"\n')
    ws.write({"p/BUILD": 'filegroup(name = "x")\n'})
    r = ws.build("//p:x")
    assert r.code == 2 and "[debian] insecure in forge.toml must be true or false" in r.err


def test_keyring_errors_are_analysis_errors(ws, mirror):
    ws.write({"p/BUILD": 'deb_package(name = "a", package = "hello", keyring = "missing.gpg")\n'
                         'kernel(name = "k", url = "http://x/vmlinuz", sha256 = "' + "0" * 64 +
                         '", keyring = "archive.gpg")\n'})
    r = ws.build("//p:a")
    assert r.code == 2 and "p/BUILD:1" in r.err and "cannot read the keyring p/missing.gpg" in r.err
    r = ws.build("//p:k")
    assert r.code == 2 and "keyring applies only to a kernel package from the mirror" in r.err


# ---- debian_rootfs: apt's own verification, through mmdebstrap --------------------------

def _rootfs(ws, keyring_line: str):
    ws.write({"p/BUILD": f'debian_rootfs(name = "root", suite = "bookworm", variant = "extract", '
                         f'packages = ["hello"]{keyring_line})\n'})


def test_mmdebstrap_refuses_an_archive_signed_by_an_unknown_key(ws, mirror, keys, tmp_path):
    require(shutil.which("mmdebstrap") is not None, "mmdebstrap is not installed")
    url, www = mirror
    build_archive(www, _debs(tmp_path), keys.key("stranger"))
    _rootfs(ws, ', keyring = "archive.gpg"')
    r = ws.build("//p:root", timeout=300)
    _assert_user_error(r)
    assert f"NO_PUBKEY {keys.key('stranger').fingerprint[-16:]}" in r.err, r.err[-3000:]
    assert "is not signed" in r.err and "--keyring=/tmp/forge-keyring-" in r.err  # the argv is shown
    for off in ("trusted=yes", "AllowInsecureRepositories", "AllowUnauthenticated", "--aptopt"):
        assert off not in r.err
    root = next(a for a in _analyse(ws.root, "//p:root").actions if a.mnemonic == "DebianRootfs")
    assert root.params["trusted_keys"] == [keys.key("archive").fingerprint]
    assert [i.path for i in root.inputs] == ["p/archive.gpg"]


def test_mmdebstrap_gets_past_apt_update_with_the_right_key(ws, mirror, keys, tmp_path):
    require(shutil.which("mmdebstrap") is not None, "mmdebstrap is not installed")
    url, www = mirror
    build_archive(www, _debs(tmp_path), keys.key("archive"))
    _rootfs(ws, ', keyring = "archive.gpg"')
    r = ws.build("//p:root", timeout=300)
    # apt took the suite; what stops it is the test package's missing dependencies
    assert "NO_PUBKEY" not in r.err and "not signed" not in r.err, r.err[-3000:]
    assert "libc6 (>= 2.36) but it is not installable" in r.err, r.err[-3000:]
