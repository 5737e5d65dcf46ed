"""Where the shared cache is and how to talk to it: `[remote]` in forge.toml, overridden
by `--remote-cache`, `--remote-upload`, `--remote-instance` and `--remote-timeout`.

    [remote]
    cache = "https://cache.example:8443/forge"   # or grpc://host:port, grpcs://host:port
    instance = "main"                             # REAPI instance name (gRPC only)
    upload = false                                # developers read, CI writes
    timeout = 60                                  # seconds per request
    jobs = 16                                     # concurrent transfers
    ca_cert = "/etc/ssl/private-ca.pem"           # extra CA for https/grpcs
    executor = "grpcs://farm.example:8980"        # REAPI Execution service (remote execution)
    executor_instance = "main"                    # its instance (default: instance)
    local_fallback = true                         # the farm failing costs a local run
    queue_timeout = 120                           # seconds an action may wait for a worker
    pool_properties = {docker = {docker = "1"}}   # an action's pool -> platform properties

`executor_from_config` reads the executor part (`--remote-executor`,
`--remote-instance-name`, `--remote-local-fallback`): same TLS and credentials.

Credentials never live in forge.toml (it is committed): a bearer token comes from the
environment variable FORGE_REMOTE_TOKEN, a user name and password from the URL
(`https://user:pass@host/`) or from ~/.netrc (`machine host login user password pw`).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from forge.errors import UsageError

SCHEMES = ("http", "https", "grpc", "grpcs")


@dataclass(frozen=True)
class RemoteSettings:
    url: str  # without credentials: safe to print
    scheme: str  # http | https | grpc | grpcs
    host: str
    port: int
    path: str  # HTTP base path, "" or "/forge"
    instance: str = ""
    upload: bool = False
    timeout: float = 60.0
    jobs: int = 16
    ca_cert: str | None = None
    authorization: str | None = field(default=None, repr=False)  # an Authorization header

    @property
    def grpc(self) -> bool:
        return self.scheme in ("grpc", "grpcs")

    @property
    def tls(self) -> bool:
        return self.scheme in ("https", "grpcs")


def from_config(config: dict, *, url: str | None = None, upload: bool | None = None,
                instance: str | None = None, timeout: float | None = None,
                env: dict | None = None) -> RemoteSettings | None:
    """The remote cache to use, or None when none is configured (or `--remote-cache=`)."""
    env = os.environ if env is None else env
    table = config.get("remote", {})
    url = table.get("cache") if url is None else url
    if not url:
        return None
    raw = urlsplit(url)
    scheme = raw.scheme.lower()
    if scheme not in SCHEMES or not raw.hostname:
        raise UsageError(f"remote cache '{url}' is not a URL forge can use",
                         hint="use http(s)://host[:port]/path for a Bazel HTTP cache (nginx, "
                         "bazel-remote) or grpc(s)://host:port for a REAPI server (BuildGrid)")
    try:
        port = raw.port or {"http": 80, "https": 443, "grpc": 80, "grpcs": 443}[scheme]
    except ValueError:
        raise UsageError(f"remote cache '{url}' has an invalid port") from None
    try:
        timeout = float(table.get("timeout", 60) if timeout is None else timeout)
        jobs = int(table.get("jobs", 16))
    except (TypeError, ValueError):
        raise UsageError("[remote] timeout and jobs in forge.toml must be numbers") from None
    if timeout <= 0 or jobs < 1:
        raise UsageError("the remote timeout must be positive and [remote] jobs at least 1")
    host = raw.hostname
    shown = f"{scheme}://{host}" + (f":{raw.port}" if raw.port else "") + raw.path.rstrip("/")
    return RemoteSettings(
        url=shown, scheme=scheme, host=host, port=port, path=raw.path.rstrip("/"),
        instance=str(table.get("instance", "") if instance is None else instance),
        upload=bool(table.get("upload", False)) if upload is None else upload,
        timeout=timeout, jobs=jobs, ca_cert=table.get("ca_cert"),
        authorization=_authorization(raw, env))


def _authorization(raw, env) -> str | None:
    token = env.get("FORGE_REMOTE_TOKEN")
    if token:
        return f"Bearer {token.strip()}"
    user, password = raw.username, raw.password
    if user is None:
        user, password = _netrc(raw.hostname, env)
    if user is None:
        return None
    pair = f"{unquote(user)}:{unquote(password or '')}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def _netrc(host: str, env) -> tuple[str | None, str | None]:
    import netrc
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None, None
    if not auth:
        return None, None
    return auth[0], auth[2]


@dataclass(frozen=True)
class ExecutorSettings:
    """Where actions run remotely; `remote` is the endpoint (also its CAS and cache)."""

    remote: RemoteSettings
    local_fallback: bool = True
    queue_timeout: float = 120.0  # an action no worker takes in that time runs locally
    # pool -> the platform properties a worker must have to run that pool's actions: the
    # pool says what an action needs here (the Docker engine), the farm names it its way.
    pool_properties: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()

    def platform(self, pool: str | None, own: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """The properties an action of `pool` is sent with: its pool's, then its own
        `exec_properties`, which win (the rule knows the one action best)."""
        merged = dict(dict(self.pool_properties).get(pool, ())) if pool else {}
        merged.update(own)
        return tuple(sorted(merged.items()))


def executor_from_config(config: dict, *, url: str | None = None, instance: str | None = None,
                         local_fallback: bool | None = None, timeout: float | None = None,
                         env: dict | None = None) -> ExecutorSettings | None:
    """The remote executor, or None when none is configured (or `--remote-executor=`)."""
    table = config.get("remote", {})
    url = table.get("executor") if url is None else url
    if not url:
        return None
    if not url.lower().startswith(("grpc://", "grpcs://")):
        raise UsageError(f"remote executor '{url}' is not a grpc:// or grpcs:// URL",
                         hint="remote execution speaks REAPI over gRPC: "
                         "--remote-executor grpc://host:port (BuildGrid)")
    if instance is None:
        instance = table.get("executor_instance", table.get("instance", ""))
    remote = from_config({"remote": {**table, "cache": url}}, url=url, upload=True,
                         instance=str(instance), timeout=timeout, env=env)
    try:
        queue_timeout = float(table.get("queue_timeout", 120))
    except (TypeError, ValueError):
        raise UsageError("[remote] queue_timeout in forge.toml must be a number") from None
    fallback = bool(table.get("local_fallback", True)) if local_fallback is None else local_fallback
    return ExecutorSettings(remote, fallback, queue_timeout,
                            _pool_properties(table.get("pool_properties", {})))


def _pool_properties(table) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    bad = UsageError("[remote] pool_properties in forge.toml must map each pool to a table of "
                     "string properties", hint='pool_properties = {docker = {docker = "1"}}')
    if not isinstance(table, dict):
        raise bad
    out = []
    for pool, props in sorted(table.items()):
        if not isinstance(props, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in props.items()):
            raise UsageError(f"[remote] pool_properties: pool {pool!r} must map to a table of "
                             "string properties", hint='pool_properties = {docker = {docker = "1"}}')
        out.append((pool, tuple(sorted(props.items()))))
    return tuple(out)
