"""Image rules and a real registry: oci_push, oci_pull pinned through forge.lock,
FROM a registry reference, --offline and forge lock."""

from __future__ import annotations

import json

import pytest

from conftest import Workspace
from registry_fixture import registry  # noqa: F401  (fixture)

pytestmark = pytest.mark.real


def new_ws(tmp_path, name, cache=None):
    root = tmp_path / name
    root.mkdir()
    (root / "forge.toml").write_text("")
    return Workspace(root, cache or tmp_path / f"{name}-cache")


def publish(w, registry, content: str, tag="v1"):
    w.write({"img/a.txt": content, "img/Dockerfile": "FROM scratch\nCOPY a.txt /a.txt\n",
             "img/BUILD": f'''
        container_image(name = "img", srcs = ["a.txt"])
        oci_push(name = "push", image = ":img", repository = "{registry.host}/team/app", tags = ["{tag}"])
    '''})
    r = w.forge("run", "//img:push")
    assert r.code == 0, r.err
    return r.out.strip().split("@")[1]


def layer_text(layout) -> str:
    import tarfile
    from forge.formats.image.layout import read_image
    img = read_image(layout)
    with tarfile.open(img.layers[-1][1]) as tf:
        return tf.extractfile("a.txt").read().decode()


def test_pull_by_tag_is_pinned_and_works_offline(tmp_path, registry):
    digest = publish(new_ws(tmp_path, "producer"), registry, "one\n")
    w = new_ws(tmp_path, "consumer")
    w.write({"p/BUILD": f'oci_pull(name = "app", image = "{registry.host}/team/app:v1")\n'})
    r = w.build("//p:app")
    assert r.code == 0, r.err
    lock = json.loads((w.root / "forge.lock").read_text())
    assert lock["pins"]["oci"] == {f"{registry.host}/team/app:v1": digest}
    assert layer_text(w.root / "forge-out/p/app") == "one\n"
    # Offline with the lock and the cache: nothing to fetch.
    r = w.build("//p:app", "--offline")
    assert r.code == 0 and r.err.strip().endswith("0 executed, 1 cached")
    # Offline with the lock but an empty cache: a clear error, no traceback.
    fresh = new_ws(tmp_path, "fresh")
    fresh.write({"p/BUILD": (w.root / "p/BUILD").read_text(),
                 "forge.lock": (w.root / "forge.lock").read_text()})
    r = fresh.build("//p:app", "--offline")
    assert r.code == 1 and "--offline forbids pulling it" in r.err and "Traceback" not in r.err
    # Offline without a pin: an analysis error.
    (fresh.root / "forge.lock").unlink()
    r = fresh.forge("build", "//p:app", "--offline")
    assert r.code == 2 and "not pinned in forge.lock" in r.err


def test_a_moved_tag_changes_only_with_forge_lock(tmp_path, registry):
    producer = new_ws(tmp_path, "producer")
    first = publish(producer, registry, "one\n")
    w = new_ws(tmp_path, "consumer")
    w.write({"p/BUILD": f'oci_pull(name = "app", image = "{registry.host}/team/app:v1")\n'})
    assert w.build("//p:app").code == 0
    second = publish(producer, registry, "two\n")
    assert second != first
    assert w.build("//p:app").code == 0
    assert layer_text(w.root / "forge-out/p/app") == "one\n"  # pinned: the old bytes
    r = w.forge("lock")
    assert r.code == 0, r.err
    assert json.loads((w.root / "forge.lock").read_text())["pins"]["oci"][
        f"{registry.host}/team/app:v1"] == second
    assert w.build("//p:app").code == 0
    assert layer_text(w.root / "forge-out/p/app") == "two\n"


def test_from_a_registry_reference_and_a_wrong_digest(tmp_path, registry):
    digest = publish(new_ws(tmp_path, "producer"), registry, "base\n")
    w = new_ws(tmp_path, "consumer")
    w.write({"c/b.txt": "top\n", "c/Dockerfile": f"FROM {registry.host}/team/app:v1\nCOPY b.txt /b.txt\n",
             "c/BUILD": 'container_image(name = "c", srcs = ["b.txt"])\n',
             "d/BUILD": f'oci_pull(name = "bad", image = "{registry.host}/team/app", '
                        f'digest = "sha256:{"0" * 64}")\n'})
    r = w.build("//c")
    assert r.code == 0, r.err
    from forge.formats.image.layout import read_image
    img = read_image(w.root / "forge-out/c/c.stages/0")
    assert len(img.layers) == 2
    assert json.loads((w.root / "forge.lock").read_text())["pins"]["oci"][
        f"{registry.host}/team/app:v1"] == digest
    r = w.build("//d:bad")
    assert r.code == 1 and "OciPull" in r.err and "Traceback" not in r.err
