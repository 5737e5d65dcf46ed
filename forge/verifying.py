"""`forge verify`: check an output file or directory, a target's outputs, or an image in a
registry against a DSSE envelope signed by a given public key.

A check passes when one signature of the envelope verifies with the key (over DSSE's PAE,
before anything in the payload is read), the payload is an in-toto Statement, and one of
its subjects has the sha256 of the bytes checked (forge.signing.subjects_of). Every
failure is a `VerifyFailed` (exit 1) saying which of these broke and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from forge.errors import EXIT_BUILD_FAILED, ForgeError, UsageError
from forge.formats.sign import attest, dsse
from forge.formats.sign.errors import KeyFileError, SignError
from forge.formats.sign.keys import PublicKey, load_public
from forge.signing import envelope_path, subjects_of

MAX_ENVELOPE = 64 << 20  # an SBOM statement can be large; a registry's blob is capped here


class VerifyFailed(ForgeError):
    exit_code = EXIT_BUILD_FAILED


@dataclass
class Verified:
    """One artifact that passed: what, by which envelope, its Statement's predicate type."""

    what: str
    envelope: str
    predicate_type: str
    keyid: str
    digests: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        d = ", ".join(f"sha256:{x[:16]}…" for x in self.digests[:3])
        more = f" (+{len(self.digests) - 3})" if len(self.digests) > 3 else ""
        return (f"OK {self.what}: {d}{more} signed by key {self.keyid[:16]} "
                f"({self.predicate_type}) in {self.envelope}")


def public_key(path: str) -> PublicKey:
    try:
        return load_public(Path(path))
    except KeyFileError as e:
        raise UsageError(str(e), hint="--key takes the public key (the .pub file `forge "
                         "keygen` wrote) of whoever signed") from None


def check_envelope(data: bytes, key: PublicKey, where: str) -> dict:
    """The Statement inside envelope bytes, once its signature verified with `key`."""
    try:
        env = dsse.decode(data, where)
        payload = dsse.verify(env, key, where)
        if env["payloadType"] != attest.PAYLOAD_TYPE:
            raise VerifyFailed(f"{where}: payload type {env['payloadType']!r} is not an in-toto "
                               f"Statement ({attest.PAYLOAD_TYPE})")
        return attest.parse(payload, where)
    except SignError as e:
        raise VerifyFailed(str(e)) from None


def verify_path(path: Path, key: PublicKey, signature: Path | None = None,
                shown: str | None = None) -> Verified:
    """Check a file or directory against its envelope (`signature`, else PATH.dsse.json)."""
    shown = shown or str(path)
    env_path = signature or envelope_path(path)
    try:
        data = env_path.read_bytes()
    except FileNotFoundError:
        raise VerifyFailed(f"no signature for {shown}: {env_path} does not exist",
                           hint="build with [sign] key in forge.toml or --sign-key, or name the "
                           "envelope with --signature") from None
    except OSError as e:
        raise VerifyFailed(f"cannot read the signature {env_path}: {e.strerror or e}") from None
    st = check_envelope(data, key, str(env_path))
    if not path.exists():
        raise VerifyFailed(f"{shown} does not exist: nothing to check against {env_path}")
    if path.is_dir() and not (path / "oci-layout").is_file():
        digests = _check_tree(path, shown, st, str(env_path))
    else:
        digests = []
        try:
            for s in subjects_of(path, shown):
                attest.match(st, s["digest"]["sha256"], s["name"], str(env_path))
                digests.append(s["digest"]["sha256"])
        except SignError as e:
            raise VerifyFailed(str(e)) from None
        if path.is_dir():  # the signed manifests are intact: so must every blob they name be
            from forge.formats.image.errors import ImageError
            from forge.formats.image.layout import verify_layout
            try:
                verify_layout(path)
            except ImageError as e:
                raise VerifyFailed(f"{shown}: its manifests are the signed ones, but {e}: the "
                                   "image was changed after it was signed") from None
    return Verified(shown, str(env_path), st.get("predicateType", "?"), key.keyid, digests)


def registry_client(config: dict):
    """A registry client set up from forge.toml's [registries], as the image rules make it."""
    from forge.formats.registry.client import RegistryClient
    regs = config.get("registries", {})
    return RegistryClient(insecure=regs.get("insecure", []), mirrors=regs.get("mirrors", {}),
                          ca_bundle=regs.get("ca_cert"))


def _check_tree(path: Path, shown: str, st: dict, where: str) -> list[str]:
    """A directory matches when each of its files is signed under its own path with its
    sha256, and every file signed is still there. The signed names carry the directory's
    name at signing time as a prefix (found from the files present), so a copy under
    another name verifies; subjects outside that prefix (other outputs of one provenance)
    are not the directory's."""
    signed = {s.get("name"): s["digest"].get("sha256") for s in st["subject"]
              if isinstance(s.get("name"), str)}
    present = {sub["name"][len(shown) + 1:]: sub["digest"]["sha256"]
               for sub in subjects_of(path, shown)}
    prefix = next((n[:len(n) - len(r)] for r in sorted(present, key=len, reverse=True)
                   for n in signed if n == r or n.endswith("/" + r)), None)
    if prefix is None:
        raise VerifyFailed(f"{where} signs none of the files in {shown}: it is the signature "
                           "of something else")
    for rel, sha in sorted(present.items()):
        if signed.get(prefix + rel) != sha:
            why = "was changed after it was signed" if prefix + rel in signed else \
                "is not signed (it was added after signing)"
            raise VerifyFailed(f"{shown}/{rel} (sha256:{sha[:16]}…) {why}: {where} does not "
                               "sign these bytes under this path")
    gone = sorted(n[len(prefix):] for n in signed if n.startswith(prefix)
                  and n[len(prefix):] not in present)
    if gone:
        raise VerifyFailed(f"{shown} lacks {len(gone)} file(s) that {where} signs: "
                           f"{', '.join(gone[:5])}: the directory was changed after it was signed")
    return sorted(present.values())


def verify_image(client, ref: str, key: PublicKey) -> list[Verified]:
    """Check an image in a registry: its referrers (the OCI 1.1 API, else the tag-schema
    fallback) must hold a DSSE envelope signed by `key` naming the image's digest."""
    from forge.formats.image.reference import Reference
    from forge.formats.registry.errors import RegistryError
    from forge.formats.registry.referrers import ENVELOPE_TYPE
    try:
        r = Reference.of(ref)
        digest = str(client.resolve(r).digest)
        found = client.referrers(r, digest, ENVELOPE_TYPE)
    except RegistryError as e:
        raise VerifyFailed(f"cannot check {ref}: {e}") from None
    if not found:
        raise VerifyFailed(f"{ref} ({digest}) has no signature attached: the registry lists no "
                           f"referrer of type {ENVELOPE_TYPE}",
                           hint="push it with oci_push and [sign] key set, which attaches the "
                           "build's signed statements")
    good, failures = [], []
    for desc, blobs in found:
        where = f"referrer {desc['digest'][:19]}… of {ref}"
        for data in blobs:
            try:
                st = check_envelope(data, key, where)
                attest.match(st, digest.split(":", 1)[1], f"{ref} ({digest})", where)
            except (VerifyFailed, SignError) as e:
                failures.append(str(e))
                continue
            good.append(Verified(f"{r.repository}@{digest}", where, st.get("predicateType", "?"),
                                 key.keyid, [digest.split(":", 1)[1]]))
    if not good:
        raise VerifyFailed(f"no signature of {ref} verifies:\n  " + "\n  ".join(failures))
    return good
