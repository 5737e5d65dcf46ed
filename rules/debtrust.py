"""Which keys forge trusts for a Debian suite, planned once per target.

The keyring is, first found: the target's `keyring` attribute (an absolute host path, or
a label of a file of the workspace), `[debian] keyring` in forge.toml (an absolute path,
or one relative to the workspace root), else what apt trusts for that source on this
machine (`forge.formats.debian.keyring.apt_keyrings`). Everything read to decide is read
through the analysis context, so a changed keyring or apt source plans again.

The sorted primary fingerprints of that keyring enter the keys of the actions that fetch
from the mirror (DebFetch, Mmdebstrap): trusting other keys is another build. The pin
resolvers (kernel.py) verify the suite with the same keyring: the rule hands it over in
a context variable for the duration of `ctx.pin`, since a resolver sees only its key.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from pathlib import Path

from forge.api import ActionFailed, parse_label
from forge.formats.debian import errors as debian_errors
from forge.formats.debian import keyring as debian_keyring
from forge.formats.debian import sources as aptsources

HOW_TO_TRUST = ('install the keyring package that holds the key (Debian\'s own: apt-get install '
                'debian-archive-keyring), or name a keyring that does: keyring = "<label or '
                '/path>" on the target, or [debian] keyring = "<path>" in forge.toml')


@dataclass(frozen=True)
class Trust:
    keyrings: tuple  # host files (Path) and workspace files (their bytes), for gpgv
    fingerprints: tuple[str, ...]
    insecure: bool = False  # [debian] insecure = true: signatures are not checked
    what: str = ""  # which keyring, in words, for messages
    host_keyring: str | None = None  # a named host file, for mmdebstrap --keyring
    workspace_keyring: str | None = None  # a named workspace file (an action input)

    def params(self) -> dict:
        """What enters the keys of the actions that fetch from the mirror."""
        return {"trusted_keys": list(self.fingerprints), **({"insecure": True} if self.insecure else {})}


_CURRENT: contextvars.ContextVar[Trust | None] = contextvars.ContextVar("debian_trust", default=None)


def mirror_for(config: dict) -> str:
    configured = config.get("debian", {}).get("mirror")
    if configured:
        return configured
    found = aptsources.debian_mirror(aptsources.read_sources())
    if not found:
        raise ActionFailed("no Debian mirror: this machine's apt sources name no Debian archive",
                           hint='set it in forge.toml: [debian] mirror = "http://<host>/debian"')
    return found


def mirror_or_none(config: dict) -> str | None:
    try:
        return mirror_for(config)
    except ActionFailed:
        return None


def trust_for(ctx, suite: str, *, for_apt: bool = False) -> Trust:
    """The keyring for `suite` as the target and forge.toml name it (see the docstring).
    `for_apt`: for mmdebstrap, whose apt verifies whatever forge.toml says."""
    section = ctx.config.get("debian", {})
    if section.get("insecure") is True and not for_apt:
        return Trust((), (), True, "none ([debian] insecure = true)")
    read = lambda p: ctx.read_file(str(p))  # noqa: E731
    listdir = lambda p: ctx.list_dir(str(p))  # noqa: E731
    named, where = getattr(ctx.attr, "keyring", "") or "", "keyring"
    if named and not named.startswith("/"):
        label = parse_label(named, ctx.package)
        rel = f"{label.package}/{label.name}" if label.package else label.name
        return _named(ctx, rel, f"{rel} (keyring of {ctx.label})", workspace=True, attr=where)
    if named:
        return _named(ctx, named, named, attr=where)
    named = section.get("keyring") or ""
    if named:
        return _named(ctx, named, f"{named} ([debian] keyring in forge.toml)",
                      workspace=not named.startswith("/"), attr=None)
    mirror = mirror_or_none(ctx.config)
    try:
        sources = aptsources.read_sources(read=read, listdir=listdir)
        rings = debian_keyring.apt_keyrings(mirror or "", suite, sources, listdir=listdir)
        fprs = debian_keyring.keyring_fingerprints(rings, read=read)
    except debian_errors.KeyringError as e:
        raise ctx.fail(f"a keyring apt trusts for suite {suite} cannot be read: {e}",
                       hint='name another: keyring = "<label or /path>", or [debian] keyring '
                       'in forge.toml') from None
    what = ", ".join(map(str, rings)) + " (what apt trusts for this source)" if rings else \
        "none: this machine's apt trusts no keyring for this source"
    return Trust(tuple(rings), tuple(fprs), False, what)


def _named(ctx, path: str, what: str, *, workspace: bool = False, attr: str | None) -> Trust:
    try:
        data = ctx.read_file(path)
        fprs = debian_keyring.keyring_fingerprints([data])
    except OSError as e:
        raise ctx.fail(f"cannot read the keyring {path}: {e.strerror or e}", attr=attr,
                       hint="name an OpenPGP keyring file (.gpg or .asc) that exists") from None
    except debian_errors.KeyringError as e:
        raise ctx.fail(f"the keyring {path} is not usable: {e}", attr=attr) from None
    if workspace:
        return Trust((data,), tuple(fprs), False, what, workspace_keyring=path)
    return Trust((Path(path),), tuple(fprs), False, what, host_keyring=path)


def pin(ctx, kind: str, key: str, trust: Trust) -> str:
    """`ctx.pin`, with `trust` as the keyring the resolver verifies the suite with."""
    token = _CURRENT.set(trust)
    try:
        return ctx.pin(kind, key)
    finally:
        _CURRENT.reset(token)


def current(config: dict, suite: str) -> Trust:
    """The keyring the running resolver must use (what the rule planned), or apt's."""
    trust = _CURRENT.get()
    if trust is not None:
        return trust
    if config.get("debian", {}).get("insecure") is True:
        return Trust((), (), True, "none ([debian] insecure = true)")
    rings = debian_keyring.apt_keyrings(mirror_or_none(config) or "", suite, aptsources.read_sources())
    return Trust(tuple(rings), (), False, ", ".join(map(str, rings)) or "none")


_HINTS = {
    debian_errors.UnknownKeyError: HOW_TO_TRUST,
    debian_errors.UnsignedReleaseError: "forge uses only signed suites; sign the archive (InRelease), "
    "or, knowing that anyone who can answer for the mirror then picks the packages, set "
    "[debian] insecure = true in forge.toml",
    debian_errors.BadSignatureError: "the mirror's answer was altered or is broken; try again, or use "
    "another mirror ([debian] mirror in forge.toml)",
    debian_errors.WorthlessSignatureError: "update the keyring (apt-get install debian-archive-keyring, "
    "or a newer copy of the named keyring)",
    debian_errors.ExpiredReleaseError: "the mirror is stale; use an up-to-date mirror ([debian] mirror), "
    "or fix this machine's clock",
    debian_errors.FutureReleaseError: "fix this machine's clock (or the mirror's)",
    debian_errors.GpgvError: "apt-get install gpgv",
}


def failure(e: Exception, trust: Trust | None, doing: str) -> ActionFailed:
    """A Debian fetch failure as a build failure (exit 1): what, why, how to fix."""
    if isinstance(e, debian_errors.ReleaseError):
        hint = next((h for cls, h in _HINTS.items() if isinstance(e, cls)), HOW_TO_TRUST)
        said = str(e)
        if e.signer not in said:
            said += " (unsigned)" if e.signer == "unsigned" else f" (signed by key {e.signer})"
        return ActionFailed(f"{doing}: {said}; trusted keyring: {trust.what if trust else '?'}", hint=hint)
    if isinstance(e, debian_errors.DigestMismatchError):
        return ActionFailed(f"{doing}: {e}", hint="try again (a mirror being updated), or use "
                            "another mirror ([debian] mirror in forge.toml)")
    return ActionFailed(f"{doing}: {e}")
