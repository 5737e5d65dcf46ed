"""Which proxy a URL goes through, read from the environment as curl (7.88) reads it:

* `http_proxy` for http:// URLs, `https_proxy` or `HTTPS_PROXY` for https://, and
  `all_proxy` or `ALL_PROXY` for both when the specific one is unset; the lowercase name
  wins, an empty value counts as unset, and a proxy without a scheme is http://.
* `no_proxy` or `NO_PROXY` (lowercase wins): names separated by commas (or blanks).
  `*` alone bypasses every proxy. A name matches itself and every name under it
  (`example.com` and `.example.com` both match `example.com` and `www.example.com`, never
  `notexample.com`), case-insensitively, ignoring a trailing dot. An IP address (v4 or v6,
  with an optional `/bits` CIDR suffix) matches hosts written as addresses in that network;
  names are never resolved to match addresses.
* Loopback is not bypassed implicitly: with a proxy set and no `no_proxy`, a request to
  127.0.0.1 or localhost goes through the proxy, as with curl.

Two departures from curl, both towards what a user means: curl ignores the uppercase
`HTTP_PROXY` (a CGI program's environment can set it from a request header); forge reads
it too, except when `REQUEST_METHOD` says it runs as a CGI program (as Go does). And curl
never matches a `host:port` entry; here it matches that host on that port only.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit


def _env(env: Mapping[str, str], name: str, upper: bool = True) -> str | None:
    for key in (name, name.upper()) if upper else (name,):
        value = env.get(key, "").strip()
        if value:
            return value
    return None


def _with_scheme(proxy: str | None) -> str | None:
    if proxy and "://" not in proxy:
        return "http://" + proxy
    return proxy


@dataclass(frozen=True)
class ProxySettings:
    """The proxies of one environment; `proxy_for(url)` picks one or None (direct)."""

    http: str | None = None
    https: str | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ProxySettings":
        env = os.environ if env is None else env
        every = _env(env, "all_proxy")
        http = _env(env, "http_proxy", upper="REQUEST_METHOD" not in env) or every
        https = _env(env, "https_proxy") or every
        raw = _env(env, "no_proxy") or ""
        entries = tuple(e for e in raw.replace(" ", ",").replace("\t", ",").split(",") if e)
        return cls(_with_scheme(http), _with_scheme(https), entries)

    def proxy_for(self, url: str) -> str | None:
        u = urlsplit(url)
        proxy = {"http": self.http, "https": self.https}.get(u.scheme)
        if proxy is None or bypass(u.hostname or "", u.port or _DEFAULT_PORT.get(u.scheme),
                                   self.no_proxy):
            return None
        return proxy


_DEFAULT_PORT = {"http": 80, "https": 443}


def bypass(host: str, port: int | None, entries: tuple[str, ...] | list[str]) -> bool:
    """Whether `no_proxy` `entries` exempt `host` (a name, or an address without
    brackets) on `port` from the proxy."""
    if not host:
        return False
    if list(entries) == ["*"]:
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    name = host.lower().rstrip(".")
    for entry in entries:
        entry, want_port = _split_port(entry.strip())
        if not entry or (want_port is not None and want_port != port):
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.lower().rstrip(".").lstrip(".")
        if entry and (name == entry or name.endswith("." + entry)):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    """`host:port`, `[v6]:port` or `1.2.3.4:port` -> (host, port); a bare IPv6 address
    (several colons, no brackets) has no port."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None
