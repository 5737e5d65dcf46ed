"""A suite authenticated as apt does it: real gpg keys, a real archive over loopback HTTP,
real gpgv. Each way a mirror's answer can be wrong gives its own error."""

from __future__ import annotations

import hashlib
import lzma
import shutil
import subprocess
import tempfile
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from debian_archive import Keys, Server, build_archive
from package_builders import make_deb
from forge.formats.debian import errors as E
from forge.formats.debian.archive import download, fetch_index, fetch_release, resolve
from forge.formats.debian.keyring import apt_keyrings, dearmor, fingerprints, keyring_fingerprints
from forge.formats.debian.sources import Source, read_sources

pytestmark = pytest.mark.real  # gpg, gpgv, dpkg-scanpackages, apt-ftparchive


@pytest.fixture(scope="module")
def keys():
    k = Keys()
    yield k
    k.close()


@pytest.fixture
def world(tmp_path, keys):
    """(archive root, mirror URL, the archive key's keyring, the deb)."""
    deb = make_deb(tmp_path, "hello", "1.0-1")
    good = keys.key("archive")
    ring = good.export(tmp_path / "archive.gpg")
    srv = Server(tmp_path / "www")
    yield tmp_path / "www", srv.url + "/debian", ring, deb, good
    srv.close()


def test_good_signature(world):
    www, mirror, ring, deb, key = world
    build_archive(www, [deb], key)
    release = fetch_release(mirror, "bookworm", keyrings=[ring])
    assert release.signers == (key.fingerprint,)
    index = fetch_index(mirror, "bookworm", keyrings=[ring])
    assert [p["Package"] for p in index] == ["hello"]


def test_unknown_key(world, keys):
    www, mirror, ring, deb, _ = world
    stranger = keys.key("stranger")
    build_archive(www, [deb], stranger)
    with pytest.raises(E.UnknownKeyError) as e:
        fetch_index(mirror, "bookworm", keyrings=[ring])
    msg = str(e.value)
    assert f"suite bookworm of {mirror} is signed by key {stranger.fingerprint}" in msg
    assert str(ring) in msg and e.value.signer == stranger.fingerprint


def test_tampered_inrelease(world):
    www, mirror, ring, deb, key = world
    archive = build_archive(www, [deb], key)
    inrel = archive / "dists/bookworm/InRelease"
    inrel.write_text(inrel.read_text().replace("Origin: Forge", "Origin: Evil"))
    with pytest.raises(E.BadSignatureError, match="does not match the Release text: it was altered"):
        fetch_index(mirror, "bookworm", keyrings=[ring])


def test_text_outside_the_signed_message(world):
    www, mirror, ring, deb, key = world
    archive = build_archive(www, [deb], key)
    inrel = archive / "dists/bookworm/InRelease"
    inrel.write_text(inrel.read_text() + "SHA256:\n " + "0" * 64 + " 1 main/binary-amd64/Packages\n")
    with pytest.raises(E.BadSignatureError, match="text outside its one signed message"):
        fetch_index(mirror, "bookworm", keyrings=[ring])


def test_tampered_packages(world):
    www, mirror, ring, deb, key = world
    archive = build_archive(www, [deb], key)
    index = archive / "dists/bookworm/main/binary-amd64/Packages.xz"
    signed = hashlib.sha256(index.read_bytes()).hexdigest()
    evil = lzma.compress(b"Package: hello\nVersion: 9\nFilename: pool/evil.deb\n")
    index.write_bytes(evil)
    with pytest.raises(E.DigestMismatchError) as e:
        fetch_index(mirror, "bookworm", keyrings=[ring])
    msg = str(e.value)
    assert "dists/bookworm/main/binary-amd64/Packages.xz" in msg and f"mirror {mirror}" in msg
    assert hashlib.sha256(evil).hexdigest() in msg and signed in msg


def test_tampered_deb(world, tmp_path):
    www, mirror, ring, deb, key = world
    archive = build_archive(www, [deb], key)
    entry = resolve(fetch_index(mirror, "bookworm", keyrings=[ring]), "hello")
    served = archive / entry["Filename"]
    served.write_bytes(served.read_bytes()[:-1] + b"X")
    dest = tmp_path / "out/hello.deb"
    with pytest.raises(E.DigestMismatchError) as e:
        download(mirror, entry, dest)
    msg = str(e.value)
    assert entry["Filename"] in msg and f"mirror {mirror}" in msg
    assert entry["SHA256"] in msg and hashlib.sha256(served.read_bytes()).hexdigest() in msg
    assert not dest.exists()


def test_expired_valid_until(world):
    www, mirror, ring, deb, key = world
    past = formatdate(time.time() - 86400 * 3, usegmt=True)
    build_archive(www, [deb], key, extra_fields=f"Valid-Until: {past}")
    with pytest.raises(E.ExpiredReleaseError, match=f"expired on {past} \\(Valid-Until\\)"):
        fetch_index(mirror, "bookworm", keyrings=[ring])


def test_date_in_the_future(world):
    www, mirror, ring, deb, key = world
    build_archive(www, [deb], key)
    with pytest.raises(E.FutureReleaseError, match="later than now"):
        fetch_release(mirror, "bookworm", keyrings=[ring], now=time.time() - 3600)
    # a mirror's clock a little ahead is tolerated
    assert fetch_release(mirror, "bookworm", keyrings=[ring], now=time.time() - 60).signers


def test_release_gpg_without_inrelease(world):
    www, mirror, ring, deb, key = world
    build_archive(www, [deb], key, inrelease=False)
    assert fetch_release(mirror, "bookworm", keyrings=[ring]).signers == (key.fingerprint,)
    assert [p["Package"] for p in fetch_index(mirror, "bookworm", keyrings=[ring])] == ["hello"]


def test_tampered_release_with_release_gpg(world):
    www, mirror, ring, deb, key = world
    archive = build_archive(www, [deb], key, inrelease=False)
    (archive / "dists/bookworm/Release").write_text(
        (archive / "dists/bookworm/Release").read_text().replace("Forge", "Evil"))
    with pytest.raises(E.BadSignatureError):
        fetch_release(mirror, "bookworm", keyrings=[ring])


def test_unsigned(world):
    www, mirror, ring, deb, key = world
    build_archive(www, [deb], None)
    with pytest.raises(E.UnsignedReleaseError, match="unsigned: the mirror serves no InRelease "
                       "and no Release.gpg") as e:
        fetch_index(mirror, "bookworm", keyrings=[ring])
    assert e.value.signer == "unsigned"
    # the explicit opt-out takes it, digests still checked
    assert [p["Package"] for p in fetch_index(mirror, "bookworm", keyrings=[], insecure=True)] == ["hello"]


def test_another_suites_release(world):
    www, mirror, ring, deb, key = world
    archive = build_archive(www, [deb], key, suite="trixie")
    shutil.copytree(archive / "dists/trixie", archive / "dists/bookworm")
    with pytest.raises(E.WrongSuiteError, match="the Release of suite trixie"):
        fetch_release(mirror, "bookworm", keyrings=[ring])


def test_weak_digest_signs_nothing(world):
    www, mirror, ring, deb, key = world
    build_archive(www, [deb], key, sign_args=("--digest-algo", "SHA1"))
    with pytest.raises(E.WorthlessSignatureError, match="weak digest"):
        fetch_release(mirror, "bookworm", keyrings=[ring])


def test_expired_key_signs_nothing(world, tmp_path):
    www, mirror, ring, deb, _ = world
    home = Path(tempfile.mkdtemp(prefix="fgpx"))
    try:
        old = ["--faked-system-time", "20200101T000000!"]
        from debian_archive import Key
        k = Key(home, "")
        k.gpg(*old, "--passphrase", "", "--quick-gen-key", "Old <old@forge.test>", "ed25519", "sign", "1d")
        k.fingerprint = next(l.split(":")[9] for l in k.gpg("--with-colons", "--list-keys").stdout
                             .decode().splitlines() if l.startswith("fpr:"))
        build_archive(www, [deb], k, sign_args=tuple(old))
        with pytest.raises(E.WorthlessSignatureError, match="has expired"):
            fetch_release(mirror, "bookworm", keyrings=[k.export(tmp_path / "old.gpg")])
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_one_good_signature_of_several_is_enough(world, keys, tmp_path):
    # Debian signs with several keys; a keyring with one of them verifies the suite.
    www, mirror, ring, deb, key = world
    other = keys.key("stranger")
    archive = build_archive(www, [deb], key)
    dist = archive / "dists/bookworm"
    key.gpg("--local-user", key.fingerprint, "--local-user", other.fingerprint, "--clearsign",
            "-o", str(dist / "InRelease"), str(dist / "Release"))
    assert fetch_release(mirror, "bookworm", keyrings=[ring]).signers == (key.fingerprint,)


def test_gpgv_is_not_given_the_users_own_keys(world, monkeypatch, keys):
    www, mirror, ring, deb, key = world
    build_archive(www, [deb], keys.key("stranger"))
    monkeypatch.setenv("GNUPGHOME", str(keys.home))  # holds the stranger's key
    with pytest.raises(E.UnknownKeyError):
        fetch_release(mirror, "bookworm", keyrings=[ring])


# ---- keyrings --------------------------------------------------------------------------

def _gpg_fingerprints(path: Path) -> list[str]:
    home = tempfile.mkdtemp(prefix="fgps")
    try:
        out = subprocess.run(["gpg", "--homedir", home, "--batch", "--show-keys", "--with-colons",
                              str(path)], capture_output=True, text=True, check=True).stdout
    finally:
        shutil.rmtree(home, ignore_errors=True)
    fprs, primary = [], False
    for line in out.splitlines():
        kind = line.split(":")[0]
        if kind == "pub":
            primary = True
        elif kind == "fpr" and primary:
            fprs.append(line.split(":")[9])
            primary = False
        elif kind == "sub":
            primary = False
    return fprs


def test_fingerprints_agree_with_gpg(world, keys, tmp_path):
    _, _, ring, _, key = world
    assert fingerprints(ring.read_bytes()) == [key.fingerprint] == _gpg_fingerprints(ring)
    asc = key.export(tmp_path / "archive.asc", armor=True)
    assert dearmor(asc.read_bytes()) == ring.read_bytes()
    both = tmp_path / "both.gpg"
    both.write_bytes(ring.read_bytes() + keys.key("stranger").export(tmp_path / "s.gpg").read_bytes())
    assert keyring_fingerprints([both]) == sorted(_gpg_fingerprints(both))
    for system in [Path("/usr/share/keyrings/debian-archive-keyring.gpg"),
                   *sorted(Path("/etc/apt/trusted.gpg.d").glob("*.asc"))]:
        if system.is_file():
            assert sorted(fingerprints(system.read_bytes())) == sorted(_gpg_fingerprints(system))


def test_an_armoured_keyring_verifies(world, tmp_path):
    www, mirror, _, deb, key = world
    build_archive(www, [deb], key)
    asc = key.export(tmp_path / "archive.asc", armor=True)
    assert fetch_release(mirror, "bookworm", keyrings=[asc]).signers == (key.fingerprint,)
    assert fetch_release(mirror, "bookworm", keyrings=[asc.read_bytes()]).signers


def test_not_a_keyring(tmp_path):
    bad = tmp_path / "bad.gpg"
    bad.write_bytes(b"hello")
    with pytest.raises(E.KeyringError, match="not an OpenPGP keyring"):
        keyring_fingerprints([bad])
    with pytest.raises(E.KeyringError, match="cannot read keyring"):
        keyring_fingerprints([tmp_path / "missing.gpg"])


def test_apt_keyrings(tmp_path):
    etc = tmp_path / "etc/apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "trusted.gpg.d").mkdir()
    for n in ("b.asc", "a.gpg", "notes.txt"):
        (etc / "trusted.gpg.d" / n).write_bytes(b"")
    share = tmp_path / "debian-archive-keyring.gpg"
    share.write_bytes(b"")
    (etc / "sources.list").write_text(
        "deb [ arch=amd64 signed-by=/k/one.gpg,/k/two.gpg ] http://m.test/debian bookworm main\n"
        "deb [arch=amd64] http://other.test/debian bookworm main  # a comment\n")
    (etc / "sources.list.d/x.sources").write_text(
        "# comment\nTypes: deb\nURIs: http://d822.test/debian\nSuites: trixie\nComponents: main\n"
        "Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abcd\n -----END PGP PUBLIC KEY BLOCK-----\n"
        "\nTypes: deb\nURIs: http://off.test/debian\nSuites: trixie\nComponents: main\nEnabled: no\n")
    sources = read_sources(etc)
    assert sources[0] == Source("http://m.test/debian", ("bookworm",), ("main",), ("/k/one.gpg", "/k/two.gpg"))
    assert sources[1] == Source("http://other.test/debian", ("bookworm",), ("main",), ())
    assert len(sources) == 3 and sources[2].signed_by[0].startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nabcd")
    kw = {"etc": etc, "archive_keyring": share}
    assert apt_keyrings("http://m.test/debian/", "bookworm", sources, **kw) == [Path("/k/one.gpg"), Path("/k/two.gpg")]
    assert apt_keyrings("http://d822.test/debian", "trixie", sources, **kw) == [sources[2].signed_by[0].encode()]
    assert apt_keyrings("http://other.test/debian", "bookworm", sources, **kw) == \
        [etc / "trusted.gpg.d/a.gpg", etc / "trusted.gpg.d/b.asc", share]
