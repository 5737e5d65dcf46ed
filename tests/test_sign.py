"""Signatures: keys, DSSE envelopes over in-toto Statements, `forge keygen`, signed build
outputs, `forge verify` of a file, a target and an image pushed to a real registry (its
signatures attached as OCI 1.1 referrers, through the tag-schema fallback that Debian's
docker-registry needs), and securesystemslib as an independent checker."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from conftest import Workspace
from registry_fixture import registry  # noqa: F401  (fixture)
from forge.formats.common.files import canonical_json
from forge.formats.sign import attest, dsse
from forge.formats.sign.errors import BadSignatureError, KeyFileError, SubjectMismatchError
from forge.formats.sign.keys import generate, load_private, load_public
from forge.signing import sign_statement

KINDS = ("ecdsa", "ed25519")


# --- the formats ------------------------------------------------------------------------

def test_pae_is_the_specs_encoding():
    # The example of the DSSE protocol document.
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


@pytest.mark.parametrize("kind", KINDS)
def test_keys_round_trip_through_pem_and_keep_their_id(tmp_path, kind):
    key = generate(kind)
    (tmp_path / "k").write_bytes(key.pem)
    (tmp_path / "k.pub").write_bytes(key.public.pem)
    assert load_private(tmp_path / "k").keyid == key.keyid
    assert load_public(tmp_path / "k.pub").keyid == key.keyid
    assert load_public(tmp_path / "k").keyid == key.keyid  # a private key's public half
    assert len(key.keyid) == 64 and key.keyid != generate(kind).keyid


def test_unusable_keys_are_refused_with_the_reason(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    p = tmp_path / "k"
    p.write_bytes(generate().public.pem)
    with pytest.raises(KeyFileError, match="is a public key"):
        load_private(p)
    p.write_bytes(b"not a key")
    with pytest.raises(KeyFileError, match="not a PEM private key"):
        load_private(p)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    with pytest.raises(KeyFileError, match="ECDSA P-256 or Ed25519"):
        load_private(p)
    p384 = ec.generate_private_key(ec.SECP384R1())
    p.write_bytes(p384.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(KeyFileError, match="encrypted private key and no password"):
        load_private(p)
    with pytest.raises(KeyFileError, match="does not decrypt"):
        load_private(p, password=b"wrong")
    with pytest.raises(KeyFileError, match="ECDSA key on curve secp384r1"):
        load_private(p, password=b"pw")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_private(tmp_path / "missing")


def _statement(data: bytes = b"image bytes") -> dict:
    import hashlib
    return attest.statement([attest.subject("disk.img", hashlib.sha256(data).hexdigest())],
                            "https://example.com/p/v1", {"k": "v"})


@pytest.mark.parametrize("kind", KINDS)
def test_an_envelope_verifies_and_names_its_subject(kind):
    key = generate(kind)
    env = dsse.decode(dsse.encode(sign_statement(_statement(), key)))
    assert env["payloadType"] == attest.PAYLOAD_TYPE
    assert env["signatures"][0]["keyid"] == key.keyid
    st = attest.parse(dsse.verify(env, key.public))
    assert st == _statement()
    import hashlib
    assert attest.match(st, hashlib.sha256(b"image bytes").hexdigest(), "disk.img")["name"] == "disk.img"
    with pytest.raises(SubjectMismatchError, match="was changed after it was signed"):
        attest.match(st, hashlib.sha256(b"image bytez").hexdigest(), "disk.img")


@pytest.mark.parametrize("kind", KINDS)
def test_a_changed_payload_or_a_wrong_key_fails(kind):
    key = generate(kind)
    env = sign_statement(_statement(), key)
    with pytest.raises(BadSignatureError, match="not by the key given"):
        dsse.verify(env, generate(kind).public)
    body = bytearray(base64.b64decode(env["payload"]))
    body[-3] ^= 1  # one bit of the Statement
    bad = {**env, "payload": base64.b64encode(bytes(body)).decode()}
    with pytest.raises(BadSignatureError, match="was changed after signing"):
        dsse.verify(bad, key.public)
    retyped = {**env, "payloadType": "text/plain"}  # PAE binds the type too
    with pytest.raises(BadSignatureError):
        dsse.verify(retyped, key.public)


@pytest.mark.parametrize("kind", KINDS)
def test_securesystemslib_verifies_forges_envelopes(kind):
    """An independent implementation of DSSE and of the key types accepts what forge signs,
    and refuses it once a byte of the payload changes."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey
    key = generate(kind)
    if kind == "ecdsa":
        ssl_key = SSlibKey(key.keyid, "ecdsa", "ecdsa-sha2-nistp256",
                           {"public": key.public.pem.decode()})
    else:
        from cryptography.hazmat.primitives import serialization
        raw = key.public.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        ssl_key = SSlibKey(key.keyid, "ed25519", "ed25519", {"public": raw.hex()})
    data = dsse.encode(sign_statement(_statement(), key))
    envelope = Envelope.from_dict(json.loads(data))
    assert envelope.payload_type == attest.PAYLOAD_TYPE
    assert key.keyid in envelope.verify([ssl_key], 1)
    assert json.loads(envelope.payload) == _statement()
    tampered = json.loads(data)
    body = bytearray(base64.b64decode(tampered["payload"]))
    body[10] ^= 1
    tampered["payload"] = base64.b64encode(bytes(body)).decode()
    with pytest.raises(VerificationError):
        Envelope.from_dict(tampered).verify([ssl_key], 1)


def test_envelopes_that_are_not_envelopes_are_refused():
    from forge.formats.sign.errors import EnvelopeError
    for data, why in [(b"{", "not JSON"), (b"[]", "not a DSSE envelope"),
                      (b'{"payload":"e30=","payloadType":"t","signatures":[]}', "no signature"),
                      (b'{"payload":"%%%","payloadType":"t","signatures":[{"sig":""}]}',
                       "not valid base64")]:
        with pytest.raises(EnvelopeError, match=why):
            dsse.decode(data)


# --- the CLI: keygen, signed builds, verify -----------------------------------------------

def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path):
    w = Workspace(tmp_path, tmp_path / "cache")
    r = w.forge("keygen", "--type", "ed25519", str(tmp_path / "release"))
    assert r.code == 0, r.err
    assert stat.S_IMODE(os.stat(tmp_path / "release").st_mode) == 0o600
    assert load_public(tmp_path / "release.pub").kind == "ed25519"
    assert load_private(tmp_path / "release").keyid in r.err
    again = w.forge("keygen", str(tmp_path / "release"))
    assert again.code == 2 and "does not replace a key" in again.err
    assert w.forge("keygen", "--force", str(tmp_path / "release")).code == 0
    assert load_public(tmp_path / "release.pub").kind == "ecdsa"


def signed_ws(tmp_path, key_setting="keys/release") -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "forge.toml").write_text(f'[sign]\nkey = "{key_setting}"\n')
    w = Workspace(root, tmp_path / "cache")
    (root / "keys").mkdir()
    assert w.forge("keygen", str(root / "keys/release")).code == 0
    w.write({"BUILD": '''
        genrule(name = "disk", outs = ["disk.img"], cmd = "printf 'DISK%.0s' $$(seq 1 1000) > $@")
        genrule(name = "tree", outs = ["t/a.txt", "t/b.txt"], cmd = "echo a > $(location t/a.txt); echo b > $(location t/b.txt)")
    '''})
    return w


def test_a_signed_build_verifies_and_a_changed_byte_or_wrong_key_fails(tmp_path):
    w = signed_ws(tmp_path)
    r = w.build("//:disk")
    assert r.code == 0, r.err
    # the output, and the target's SLSA provenance (forge-out/disk.provenance.json)
    assert "signed 2 outputs" in r.err
    assert (w.root / "forge-out/disk.provenance.dsse.json").is_file()
    envelope = w.root / "forge-out/disk.img.dsse.json"
    first = envelope.read_bytes()
    # The same bytes again: the envelope stays as it was (reproducible, no churn).
    assert w.build("//:disk").code == 0 and envelope.read_bytes() == first
    pub = str(w.root / "keys/release.pub")
    ok = w.forge("verify", "//:disk", "--key", pub, "--cache-dir", str(w.cache))
    assert ok.code == 0, ok.err
    assert ok.out.startswith("OK forge-out/disk.img: sha256:")
    ok = w.forge("verify", "forge-out/disk.img", "--key", pub)
    assert ok.code == 0, ok.err
    # A customer's downloaded copy with one byte changed.
    copy = tmp_path / "download.img"
    data = bytearray((w.root / "forge-out/disk.img").read_bytes())
    data[1234] ^= 0x20
    copy.write_bytes(bytes(data))
    bad = w.forge("verify", str(copy), "--key", pub, "--signature", str(envelope))
    assert bad.code == 1, bad.err
    assert "was changed after it was signed" in bad.err and "Traceback" not in bad.err
    # The untouched copy passes, also for a customer who has forge but no workspace.
    copy.write_bytes((w.root / "forge-out/disk.img").read_bytes())
    assert w.forge("verify", str(copy), "--key", pub, "--signature", str(envelope)).code == 0
    customer = tmp_path / "customer"
    customer.mkdir()
    import shutil
    for f in (copy, envelope, w.root / "keys/release.pub"):
        shutil.copy(f, customer)
    (customer / "download.img.dsse.json").write_bytes(envelope.read_bytes())
    mine = w.forge("verify", "download.img", "--key", "release.pub", cwd=customer)
    assert mine.code == 0 and mine.out.startswith("OK download.img: sha256:"), mine.err
    # Someone else's key.
    assert w.forge("keygen", str(tmp_path / "other")).code == 0
    wrong = w.forge("verify", "forge-out/disk.img", "--key", str(tmp_path / "other.pub"))
    assert wrong.code == 1 and "not by the key given" in wrong.err
    # No envelope at all.
    missing = w.forge("verify", str(tmp_path / "other.pub"), "--key", pub)
    assert missing.code == 1 and "no signature for" in missing.err


def test_independent_check_of_a_signed_build_output(tmp_path):
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey
    import hashlib
    w = signed_ws(tmp_path)
    assert w.build("//:disk").code == 0
    key = load_public(w.root / "keys/release.pub")
    env = Envelope.from_dict(json.loads((w.root / "forge-out/disk.img.dsse.json").read_bytes()))
    env.verify([SSlibKey(key.keyid, "ecdsa", "ecdsa-sha2-nistp256", {"public": key.pem.decode()})], 1)
    st = json.loads(env.payload)
    assert st["_type"] == attest.STATEMENT_TYPE
    assert st["subject"] == [{"name": "forge-out/disk.img", "digest": {
        "sha256": hashlib.sha256((w.root / "forge-out/disk.img").read_bytes()).hexdigest()}}]
    assert st["predicate"]["target"] == "//:disk"


def test_every_output_of_a_target_is_verified_and_a_label_names_the_key(tmp_path):
    w = signed_ws(tmp_path, key_setting="//keys:release")
    r = w.build("//:tree")
    assert r.code == 0, r.err
    pub = str(w.root / "keys/release.pub")
    assert w.forge("verify", "//:tree", "--key", pub, "--cache-dir", str(w.cache)).code == 0
    # Change one of the outputs (read-only links into the cache: replace it).
    out = w.root / "forge-out/t/b.txt"
    out.unlink()
    out.write_text("B\n")
    bad = w.forge("verify", "//:tree", "--key", pub, "--cache-dir", str(w.cache))
    assert bad.code == 1 and "forge-out/t/b.txt" in bad.err


def test_a_directory_output_is_signed_file_by_file_and_any_change_fails(tmp_path):
    from forge import signing
    from forge.errors import ForgeError
    from forge.verifying import verify_path
    d = tmp_path / "out" / "rootfs"
    (d / "etc").mkdir(parents=True)
    (d / "etc/hostname").write_text("forge\n")
    (d / "init").write_text("#!/bin/sh\n")
    key = generate()
    signing.sign_outputs(tmp_path, [("//:rootfs", "out/rootfs")], key)
    ok = verify_path(d, key.public)
    assert len(ok.digests) == 2
    copy = tmp_path / "download"  # another name: the subjects match by content and path inside
    import shutil
    shutil.copytree(d, copy)
    sig = tmp_path / "out/rootfs.dsse.json"
    assert verify_path(copy, key.public, sig).digests == sorted(ok.digests)
    (copy / "etc/hostname").write_text("evil\n")
    with pytest.raises(ForgeError, match="was changed after it was signed"):
        verify_path(copy, key.public, sig)
    (copy / "etc/hostname").write_text("forge\n")
    (copy / "extra").write_text("x")
    with pytest.raises(ForgeError, match="extra .* is not signed"):
        verify_path(copy, key.public, sig)
    (copy / "extra").unlink()
    (copy / "init").rename(copy / "init2")  # same bytes, another path
    with pytest.raises(ForgeError, match="init2 .* is not signed"):
        verify_path(copy, key.public, sig)
    (copy / "init2").rename(copy / "init")
    (copy / "init").unlink()
    with pytest.raises(ForgeError, match="lacks 1 file.*init"):
        verify_path(copy, key.public, sig)


def test_an_sbom_and_a_statement_beside_an_output_are_signed_as_attestations(tmp_path):
    """A target that outputs an SPDX SBOM gets F.sbom.dsse.json (predicate: the SBOM) for
    its other outputs; a Statement F.KIND.json beside F (provenance) gets F.KIND.dsse.json."""
    import hashlib
    w = signed_ws(tmp_path)
    w.write({"BUILD": '''
        genrule(name = "os", outs = ["os.img", "os.spdx.json"], cmd = "echo disk > $(location os.img); echo '{\\"spdxVersion\\": \\"SPDX-2.3\\"}' > $(location os.spdx.json)")
    '''})
    r = w.build("//:os")
    assert r.code == 0, r.err
    out = w.root / "forge-out"
    sha = hashlib.sha256((out / "os.img").read_bytes()).hexdigest()
    key = load_public(w.root / "keys/release.pub")
    env = dsse.decode((out / "os.img.sbom.dsse.json").read_bytes())
    st = attest.parse(dsse.verify(env, key))
    assert st["predicateType"] == "https://spdx.dev/Document"
    assert st["predicate"] == {"spdxVersion": "SPDX-2.3"}
    assert attest.match(st, sha, "os.img")
    # A provenance Statement written beside the output before signing is signed too.
    prov = attest.statement([attest.subject("forge-out/os.img", sha)],
                            "https://slsa.dev/provenance/v1", {"buildDefinition": {}})
    (out / "os.img.provenance.json").write_bytes(canonical_json(prov))
    from forge import signing
    signing.sign_outputs(w.root, [("//:os", "forge-out/os.img")], load_private(w.root / "keys/release"))
    env = dsse.decode((out / "os.img.provenance.dsse.json").read_bytes())
    assert attest.parse(dsse.verify(env, key)) == prov


def test_a_missing_or_bad_signing_key_stops_the_build_before_it_starts(tmp_path):
    w = signed_ws(tmp_path)
    (w.root / "keys/release").unlink()
    r = w.build("//:disk")
    assert r.code == 2 and "does not exist" in r.err and "forge keygen" in r.err
    assert not (w.root / "forge-out").exists()
    r = w.build("//:disk", "--sign-key", str(w.root / "keys/release.pub"))
    assert r.code == 2 and "is a public key" in r.err
    r = w.build("//:disk", "--sign-key", "")  # signing off for this build
    assert r.code == 0 and not (w.root / "forge-out/disk.img.dsse.json").exists()


def test_an_encrypted_key_signs_with_its_password_from_the_environment(tmp_path):
    from cryptography.hazmat.primitives import serialization
    w = signed_ws(tmp_path)
    key = load_private(w.root / "keys/release")
    (w.root / "keys/release").write_bytes(key.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"s3cret")))
    r = w.build("//:disk")
    assert r.code == 2 and "FORGE_SIGN_PASSWORD" in r.err
    r = w.build("//:disk", env={"FORGE_SIGN_PASSWORD": "s3cret"})
    assert r.code == 0, r.err
    ok = w.forge("verify", "forge-out/disk.img", "--key", str(w.root / "keys/release.pub"))
    assert ok.code == 0, ok.err


def test_an_interrupted_signing_leaves_no_half_envelope(tmp_path, monkeypatch):
    """The envelope is written to a temporary file and renamed: a failure (Ctrl-C) while
    writing leaves the old envelope or none, never part of one."""
    from forge import signing
    out = tmp_path / "f.bin"
    out.write_bytes(b"x")
    key = generate()
    signing.sign_outputs(tmp_path, [("//:f", "f.bin")], key)
    before = (tmp_path / "f.bin.dsse.json").read_bytes()
    out.write_bytes(b"y")
    real_fdopen = os.fdopen

    class Interrupted:
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])
            raise KeyboardInterrupt

    monkeypatch.setattr("forge.formats.common.files.os.fdopen", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        signing.sign_outputs(tmp_path, [("//:f", "f.bin")], key)
    monkeypatch.undo()
    assert (tmp_path / "f.bin.dsse.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "f.bin.dsse.json"]


# --- a real registry: oci_push attaches, forge verify pulls back -------------------------

def _image_ws(tmp_path, name, registry, content, sign=True) -> Workspace:
    root = tmp_path / name
    root.mkdir()
    w = Workspace(root, tmp_path / f"{name}-cache")
    (root / "forge.toml").write_text('[sign]\nkey = "release"\n' if sign else "")
    if sign:
        assert w.forge("keygen", str(root / "release")).code == 0
    w.write({"img/a.txt": content, "img/Dockerfile": "FROM scratch\nCOPY a.txt /a.txt\n",
             "img/BUILD": f'''
        container_image(name = "img", srcs = ["a.txt"])
        oci_push(name = "push", image = ":img", repository = "{registry.host}/team/app", tags = ["v1"])
    '''})
    return w


def _push(w) -> str:
    r = w.forge("run", "//img:push")
    assert r.code == 0, r.err
    return r.out.strip().split("@")[1]


@pytest.mark.real
def test_a_pushed_image_carries_its_signature_and_verifies_from_the_registry(tmp_path, registry):
    import urllib.request
    from forge.formats.registry.referrers import ENVELOPE_TYPE
    w = _image_ws(tmp_path, "producer", registry, "one\n")
    r = w.forge("run", "//img:push")
    assert r.code == 0, r.err
    digest = r.out.strip().split("@")[1]
    assert "attached forge-out/img/img.stages/0.dsse.json" in r.err
    # docker-registry has no referrers API: the tag-schema fallback holds the index.
    with urllib.request.urlopen(urllib.request.Request(
            f"http://{registry.host}/v2/team/app/manifests/sha256-{digest.split(':')[1]}",
            headers={"Accept": "application/vnd.oci.image.index.v1+json"})) as resp:
        index = json.loads(resp.read())
    # the image's own envelope, and its SBOM's (container_image writes one)
    assert [m["artifactType"] for m in index["manifests"]] == [ENVELOPE_TYPE, ENVELOPE_TYPE]
    pub = str(w.root / "release.pub")
    ok = w.forge("verify", f"{registry.host}/team/app:v1", "--key", pub)
    assert ok.code == 0, ok.err
    assert f"OK team/app@{digest}" in ok.out
    # Pushing again attaches nothing twice.
    assert _push(w) == digest
    with urllib.request.urlopen(urllib.request.Request(
            f"http://{registry.host}/v2/team/app/manifests/sha256-{digest.split(':')[1]}",
            headers={"Accept": "application/vnd.oci.image.index.v1+json"})) as resp:
        assert len(json.loads(resp.read())["manifests"]) == 2
    # Another key does not verify it.
    assert w.forge("keygen", str(tmp_path / "other")).code == 0
    wrong = w.forge("verify", f"{registry.host}/team/app:v1", "--key", str(tmp_path / "other.pub"))
    assert wrong.code == 1 and "not by the key given" in wrong.err
    # The image pulled back into another workspace verifies against the producer's envelope.
    c = Workspace(tmp_path / "consumer", tmp_path / "consumer-cache")
    c.root.mkdir()
    (c.root / "forge.toml").write_text("")
    c.write({"p/BUILD": f'oci_pull(name = "app", image = "{registry.host}/team/app@{digest}")\n'})
    assert c.build("//p:app").code == 0
    pulled = c.forge("verify", "forge-out/p/app", "--key", pub, "--signature",
                     str(w.root / "forge-out/img/img.stages/0.dsse.json"))
    assert pulled.code == 0, pulled.err
    # One byte of a layer of that copy changes: its manifest still is the signed one, but
    # the layer no longer matches it.
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(c.root / "forge-out/p/app", copy)
    manifest = json.loads(next(p for p in (copy / "blobs/sha256").iterdir()
                               if p.name == digest.split(":")[1]).read_bytes())
    layer = copy / "blobs/sha256" / manifest["layers"][0]["digest"].split(":")[1]
    layer.chmod(0o644)
    data = bytearray(layer.read_bytes())
    data[-5] ^= 1
    layer.write_bytes(bytes(data))
    bad = c.forge("verify", str(copy), "--key", pub, "--signature",
                  str(w.root / "forge-out/img/img.stages/0.dsse.json"))
    assert bad.code == 1 and "the image was changed after it was signed" in bad.err, bad.err


@pytest.mark.real
def test_every_statement_about_a_pushed_image_is_attached_and_verified(tmp_path, registry):
    """The build signs the image target's SLSA provenance beside its layout as well as the
    layout itself and its SBOM; oci_push attaches all three; verify checks and lists them."""
    w = _image_ws(tmp_path, "producer", registry, "one\n")
    assert w.build("//img:img").code == 0
    layout = w.root / "forge-out/img/img.stages/0"
    from forge.signing import subjects_of
    prov = attest.statement(subjects_of(layout, "forge-out/img/img.stages/0"),
                            "https://slsa.dev/provenance/v1", {"buildDefinition": {}})
    (layout.parent / "0.provenance.json").write_bytes(canonical_json(prov))
    # As SLSA provenance is written for a target: forge-out/PKG/NAME.provenance.json, its
    # subjects every file of the output (the manifest's blob among them, by its digest).
    from forge.formats.sign.attest import file_sha256
    files = sorted(p for p in layout.rglob("*") if p.is_file())
    target_prov = attest.statement(
        [attest.subject(p.relative_to(w.root / "forge-out").as_posix(), file_sha256(p)) for p in files],
        "https://slsa.dev/provenance/v1", {"buildDefinition": {"externalParameters": {"target": "//img:img"}}})
    (w.root / "forge-out/img/img.provenance.json").write_bytes(canonical_json(target_prov))
    (w.root / "forge-out/img/unrelated.provenance.dsse.json").write_bytes(
        dsse.encode(sign_statement(_statement(), generate())))  # names other bytes: not attached
    r = w.build("//img:img")  # signs the image target's provenance
    assert r.code == 0 and (w.root / "forge-out/img/img.provenance.dsse.json").exists(), r.err
    r = w.forge("run", "//img:push")
    assert r.code == 0, r.err
    assert "attached forge-out/img/img.stages/0.provenance.dsse.json" in r.err
    assert "attached forge-out/img/img.provenance.dsse.json" in r.err
    assert "unrelated" not in r.err
    ok = w.forge("verify", f"{registry.host}/team/app:v1", "--key", str(w.root / "release.pub"))
    assert ok.code == 0, ok.err
    assert sorted(line.rsplit("(", 1)[1].split(")")[0] for line in ok.out.splitlines()) == [
        "https://forge.invalid/signed-output/v1", "https://slsa.dev/provenance/v1",
        "https://slsa.dev/provenance/v1", "https://spdx.dev/Document"]


@pytest.mark.real
def test_an_image_replaced_or_an_envelope_damaged_in_the_registry_fails(tmp_path, registry):
    w = _image_ws(tmp_path, "producer", registry, "one\n")
    digest = _push(w)
    pub = str(w.root / "release.pub")
    # Someone pushes other bytes under the same tag, without the key.
    other = _image_ws(tmp_path, "intruder", registry, "two\n", sign=False)
    assert _push(other) != digest
    bad = w.forge("verify", f"{registry.host}/team/app:v1", "--key", pub)
    assert bad.code == 1 and "has no signature attached" in bad.err, bad.err
    # The signed digest still verifies; then a byte of its envelope changes on the server.
    ok = w.forge("verify", f"{registry.host}/team/app@{digest}", "--key", pub)
    assert ok.code == 0, ok.err
    envelope = (w.root / "forge-out/img/img.stages/0.dsse.json").read_bytes()
    from forge.formats.image.spec import digest_of
    blob = registry.blob_path(digest_of(envelope))
    data = bytearray(blob.read_bytes())
    data[40] ^= 1
    blob.write_bytes(bytes(data))
    damaged = w.forge("verify", f"{registry.host}/team/app@{digest}", "--key", pub)
    assert damaged.code == 1 and "Traceback" not in damaged.err
    assert "hashes to" in damaged.err, damaged.err


def test_an_artifact_manifest_is_oci_1_1_and_the_fallback_tag_fits_the_tag_grammar():
    import re
    from forge.formats.registry.referrers import EMPTY_DESCRIPTOR, artifact_manifest, fallback_tag
    subject = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
               "digest": "sha256:" + "ab" * 32, "size": 123, "annotations": {"x": "y"}}
    doc = json.loads(artifact_manifest(subject, dsse.MEDIA_TYPE,
                                       [(dsse.MEDIA_TYPE, b"{}", {})], {"k": "v"}))
    assert doc["artifactType"] == dsse.MEDIA_TYPE and doc["config"] == EMPTY_DESCRIPTOR
    import hashlib
    assert EMPTY_DESCRIPTOR["digest"] == "sha256:" + hashlib.sha256(b"{}").hexdigest()
    assert doc["subject"] == {k: subject[k] for k in ("mediaType", "digest", "size")}
    assert doc["layers"][0]["size"] == 2 and doc["annotations"] == {"k": "v"}
    tag_grammar = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
    assert fallback_tag("sha256:" + "ab" * 32) == "sha256-" + "ab" * 32
    long = fallback_tag("sha512:" + "cd" * 64)
    assert long == "sha512-" + "cd" * 32 and tag_grammar.match(long)
