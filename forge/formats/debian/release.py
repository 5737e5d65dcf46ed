"""A suite's Release file, authenticated as apt authenticates it.

A mirror serves `dists/<suite>/InRelease` (the Release text, clearsigned) or, from older
tools, `Release` with a detached `Release.gpg`. The signature is checked by the real
`gpgv` against the given keyrings (gpgv trusts every key it is given, and nothing else:
that is apt's model too). Only gpgv's machine-readable `--status-fd` lines are read, and
the Release text used afterwards is what gpgv itself says was signed, so text outside the
signature can never reach a caller. As apt does:

- a suite is good when at least one signature is GOODSIG + VALIDSIG by a key of the
  keyrings with a strong digest; any BADSIG fails it (the file was altered); a signature
  by a key gpgv does not have (NO_PUBKEY) is ignored when another is good (Debian signs
  with several keys), and fails the suite when none is;
- an expired or revoked key (EXPKEYSIG, REVKEYSIG, EXPSIG), or an MD5/SHA-1 digest,
  signs nothing;
- a `Valid-Until` in the past is an error (a replayed old answer), and so is a `Date`
  later than now by more than `CLOCK_SKEW` seconds;
- the Release must be for the suite asked for (`Suite` or `Codename`), or a validly
  signed Release of another suite could be replayed in its place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Sequence

from forge.formats.debian import errors as E
from forge.formats.debian.deb822 import parse_stanzas
from forge.formats.debian.keyring import Keyring, load

CLOCK_SKEW = 600  # seconds a mirror's clock may run ahead of ours
_WEAK_DIGESTS = {"1", "2", "3"}  # MD5, SHA-1, RIPEMD-160 (OpenPGP hash algorithm IDs)
_BEGIN, _SIG = "-----BEGIN PGP SIGNED MESSAGE-----", "-----BEGIN PGP SIGNATURE-----"
_END = "-----END PGP SIGNATURE-----"


@dataclass(frozen=True)
class Release:
    """A verified Release: its fields, path -> (sha256, size) of its `SHA256:` section,
    and the primary fingerprints of the keys whose signatures were good (empty when
    verification was turned off)."""

    suite: str
    mirror: str
    fields: dict
    digests: dict
    signers: tuple[str, ...]


def parse(text: str, where: str = "Release") -> tuple[dict, dict]:
    fields = (parse_stanzas(text) or [{}])[0]
    if "SHA256" not in fields:
        raise E.DebError(f"{where} has no SHA256 section")
    rows = [line.split() for line in fields["SHA256"].splitlines()]
    bad = [w for w in rows if len(w) == 3 and not (w[1].isascii() and w[1].isdigit())]
    if bad:
        raise E.DebError(f"{where}: the SHA256 line of {bad[0][2]} has the size {bad[0][1]!r}, "
                         "not a number")
    return fields, {w[2]: (w[0].lower(), int(w[1])) for w in rows if len(w) == 3}


def _gpgv(keys: bytes, files: list[bytes], signed_output: bool, ctx: dict) -> tuple[list[list[str]], bytes, str]:
    """Run gpgv on `files` (a clearsigned file, or signature then data); its status lines
    as words, the signed text when asked for, and its human output (for messages only)."""
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise E.GpgvError(f"cannot verify suite {ctx['suite']} of {ctx['mirror']}: gpgv is not "
                          "installed (apt-get install gpgv)", **ctx)
    with tempfile.TemporaryDirectory(prefix="forge-gpgv-") as tmp:
        ring = Path(tmp, "trusted.gpg")
        ring.write_bytes(keys)
        names = []
        for i, data in enumerate(files):
            names.append(str(Path(tmp, f"in{i}")))
            Path(names[-1]).write_bytes(data)
        out = Path(tmp, "signed")
        # An empty home: no keyring of the user running forge is trusted by accident.
        argv = [gpgv, "--homedir", tmp, "--status-fd", "1", "--keyring", str(ring)]
        argv += ["--output", str(out)] if signed_output else []
        p = subprocess.run(argv + names, capture_output=True, env={**os.environ, "LC_ALL": "C"})
        status = [line.split()[1:] for line in p.stdout.decode("utf-8", "replace").splitlines()
                  if line.startswith("[GNUPG:] ")]
        signed = out.read_bytes() if signed_output and out.exists() else b""
    return status, signed, p.stderr.decode("utf-8", "replace")


def _judge(status: list[list[str]], human: str, ctx: dict, keyrings: Sequence[Keyring]) -> tuple[str, ...]:
    """The primary fingerprints of the good signatures, or the error apt would give."""
    seen = lambda kw: [w[1:] for w in status if w and w[0] == kw]  # noqa: E731
    where = f"suite {ctx['suite']} of {ctx['mirror']}"
    names = ", ".join(str(k) if not isinstance(k, bytes) else "an embedded Signed-By key"
                      for k in keyrings) or "none"
    if bad := seen("BADSIG"):
        raise E.BadSignatureError(f"{where}: the signature by key {bad[0][0]} does not match "
                                  "the Release text: it was altered after signing (a broken "
                                  "mirror or an attack); nothing from this suite is used",
                                  **{**ctx, "signer": bad[0][0]})
    good_ids = {w[0] for w in seen("GOODSIG")}
    good, weak = [], []
    for v in seen("VALIDSIG"):
        if len(v) < 10 or v[0][-16:] not in good_ids:
            continue
        (weak if v[7] in _WEAK_DIGESTS else good).append(v[9])
    if good:
        return tuple(dict.fromkeys(good))
    worthless = [(kw, w[0]) for kw in ("EXPKEYSIG", "REVKEYSIG", "EXPSIG") for w in seen(kw)]
    if worthless or weak:
        kw, key = worthless[0] if worthless else ("weak digest", weak[0])
        why = {"EXPKEYSIG": "has expired", "REVKEYSIG": "was revoked", "EXPSIG": "is an expired "
               "signature", "weak digest": "uses a weak digest (MD5/SHA-1)"}[kw]
        raise E.WorthlessSignatureError(
            f"{where} is signed by key {key}, whose signature {why}; apt refuses it too",
            **{**ctx, "signer": key})
    if missing := seen("NO_PUBKEY"):
        errsig = {w[0]: w[6] for w in seen("ERRSIG") if len(w) > 6}  # key ID -> fingerprint
        keys = [errsig.get(w[0], w[0]) for w in missing]
        raise E.UnknownKeyError(f"{where} is signed by key {', '.join(keys)}, which none of "
                                f"the trusted keyrings holds (keyrings: {names})",
                                **{**ctx, "signer": keys[0]})
    if seen("NODATA") or not status:
        raise E.UnsignedReleaseError(f"{where} holds no OpenPGP signature: it is unsigned",
                                     **ctx)
    raise E.GpgvError(f"gpgv could not verify {where}: {human.strip()[-400:]}", **ctx)


def check_clearsigned(text: str, where: str, ctx: dict) -> None:
    """apt's shape rule: exactly one signed message and nothing around it, so no one can
    hide unsigned text beside the signed one."""
    stripped = text.strip()
    if not stripped.startswith(_BEGIN):
        raise E.UnsignedReleaseError(f"{where}: InRelease is not clearsigned (it is unsigned)",
                                     **ctx)
    if text.count(_BEGIN) != 1 or text.count(_SIG) != 1 or not stripped.endswith(_END):
        raise E.BadSignatureError(f"{where}: InRelease has text outside its one signed "
                                  "message; apt refuses such a file", **ctx)


def check_dates(fields: dict, where: str, ctx: dict, now: float | None = None) -> None:
    now = time.time() if now is None else now

    def when(name: str) -> float | None:
        if name not in fields:
            return None
        try:
            return parsedate_to_datetime(fields[name]).timestamp()
        except (TypeError, ValueError, IndexError):
            raise E.ReleaseError(f"{where}: its {name} field {fields[name]!r} is not a date",
                                 **ctx) from None

    until = when("Valid-Until")
    if until is not None and until < now:
        raise E.ExpiredReleaseError(
            f"{where}: its Release expired on {fields['Valid-Until']} (Valid-Until): the mirror "
            "serves an old answer (stale or replayed); update the mirror, or check this "
            "machine's clock", **ctx)
    date = when("Date")
    if date is not None and date > now + CLOCK_SKEW:
        raise E.FutureReleaseError(
            f"{where}: its Release is dated {fields['Date']}, later than now: check this "
            "machine's clock (or the mirror's)", **ctx)


def verify(suite: str, mirror: str, *, inrelease: bytes | None, release: bytes | None = None,
           signature: bytes | None = None, keyrings: Sequence[Keyring], now: float | None = None,
           insecure: bool = False) -> Release:
    """Authenticate a suite from what its mirror served: `inrelease`, or else `release`
    with its detached `signature` (None: not served). Raises a `ReleaseError`."""
    ctx = {"suite": suite, "mirror": mirror}
    where = f"suite {suite} of {mirror}"
    if insecure:  # explicitly opted out: no signature, and so no date worth checking
        text = _insecure_text(inrelease) if inrelease is not None else (release or b"").decode("utf-8", "replace")
        fields, digests = parse(text, f"{where}: Release")
        return Release(suite, mirror, fields, digests, ())
    keys = load(keyrings)
    if inrelease is not None:
        check_clearsigned(inrelease.decode("utf-8", "replace"), where, ctx)
        status, signed, human = _gpgv(keys, [inrelease], True, ctx)
        signers = _judge(status, human, ctx, keyrings)
        text = signed.decode("utf-8", "replace")
    elif release is not None and signature is not None:
        status, _, human = _gpgv(keys, [signature, release], False, ctx)
        signers = _judge(status, human, ctx, keyrings)
        text = release.decode("utf-8", "replace")
    else:
        raise E.UnsignedReleaseError(
            f"{where} is unsigned: the mirror serves no InRelease and "
            f"{'no Release.gpg' if release is not None else 'no Release'}", **ctx)
    fields, digests = parse(text, f"{where}: Release")
    if {fields.get("Suite"), fields.get("Codename")} - {None} and \
            suite not in (fields.get("Suite"), fields.get("Codename")):
        raise E.WrongSuiteError(
            f"{where}: the mirror answered with the Release of suite {fields.get('Suite')} "
            f"(codename {fields.get('Codename')}); a signed Release of another suite is not "
            "this one", **{**ctx, "signer": signers[0]})
    check_dates(fields, where, {**ctx, "signer": signers[0]}, now)
    return Release(suite, mirror, fields, digests, signers)


def _insecure_text(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    if not text.startswith(_BEGIN):
        return text
    body = text.split("\n\n", 1)[1].split("\n" + _SIG, 1)[0]
    return "\n".join(l[2:] if l.startswith("- ") else l for l in body.splitlines())
