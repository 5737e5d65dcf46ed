"""Remote cache settings and the REAPI mapping, without a server."""

from __future__ import annotations

import base64

import pytest

from forge.errors import UsageError
from forge.remote.settings import from_config


def test_config_then_flags():
    cfg = {"remote": {"cache": "https://cache.example:8443/forge/", "upload": True,
                      "instance": "main", "timeout": 5, "jobs": 4}}
    s = from_config(cfg, env={})
    assert (s.scheme, s.host, s.port, s.path, s.instance, s.upload, s.timeout, s.jobs) == \
        ("https", "cache.example", 8443, "/forge", "main", True, 5.0, 4)
    s = from_config(cfg, url="grpc://10.0.0.1:9092", upload=False, instance="", timeout=1.5, env={})
    assert s.grpc and not s.tls and (s.port, s.upload, s.instance, s.timeout) == (9092, False, "", 1.5)
    assert from_config(cfg, url="", env={}) is None  # --remote-cache= turns it off
    assert from_config({}, env={}) is None


def test_credentials_from_url_token_and_netrc(tmp_path):
    s = from_config({}, url="https://ci:s%40cret@cache.example/forge", env={})
    assert s.authorization == "Basic " + base64.b64encode(b"ci:s@cret").decode()
    assert "s%40cret" not in s.url and "ci" not in s.url  # safe to print
    assert from_config({}, url="https://h/x", env={"FORGE_REMOTE_TOKEN": "t0k\n"}).authorization \
        == "Bearer t0k"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine cache.example login dev password pw\n")
    netrc.chmod(0o600)
    s = from_config({}, url="grpcs://cache.example:443", env={"NETRC": str(netrc)})
    assert s.authorization == "Basic " + base64.b64encode(b"dev:pw").decode()
    assert from_config({}, url="grpcs://other:443", env={"NETRC": str(netrc)}).authorization is None


@pytest.mark.parametrize("url", ["ftp://h/x", "cache.example/forge", "http://"])
def test_bad_urls(url):
    with pytest.raises(UsageError, match="is not a URL forge can use"):
        from_config({}, url=url, env={})


def test_bad_numbers():
    with pytest.raises(UsageError):
        from_config({"remote": {"cache": "http://h/", "timeout": "soon"}}, env={})
    with pytest.raises(UsageError):
        from_config({"remote": {"cache": "http://h/", "jobs": 0}}, env={})


def test_tree_round_trip_gives_the_same_manifest():
    from forge.remote import results
    entries = [["a", "d"], ["a/b", "d"], ["a/b/x", "f", "x" * 32, 3, True], ["a/empty", "d"],
               ["a/link", "l", "b/x"], ["top.txt", "f", "y" * 32, 0, False]]
    sha = {("x" * 32, True): results.digest_of(b"abc"), ("y" * 32, False): results.EMPTY}
    tree = results.tree_from_entries(entries, lambda xx, exe: sha[(xx, exe)])
    walked = results.tree_files(results.re_pb.Tree.FromString(tree.SerializeToString()))
    back = {p: (k, v) for p, k, v, _ in walked}
    assert set(back) == {e[0] for e in entries}
    assert back["a/link"] == ("l", "b/x") and back["a/empty"] == ("d", None)
    assert back["a/b/x"] == ("f", sha[("x" * 32, True)])
    # Deterministic: the same entries, the same Tree bytes.
    again = results.tree_from_entries(list(reversed(entries)), lambda xx, exe: sha[(xx, exe)])
    assert again.SerializeToString(deterministic=True) == tree.SerializeToString(deterministic=True)


def test_unsafe_tree_names_are_refused():
    from forge.remote import results
    d = results.re_pb.Directory()
    d.files.add(name="../escape", digest=results.EMPTY.proto())
    with pytest.raises(results.ShapeError):
        results.tree_files(results.re_pb.Tree(root=d))


def test_remote_key_depends_on_the_key_only():
    from forge.remote.results import action_digest
    a, b = action_digest("0" * 32), action_digest("1" * 32)
    assert a != b and a == action_digest("0" * 32) and len(a.hash) == 64
