"""`forge affected` on a scripted git history: which targets a change touches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from forge.affected import find_affected
from forge.errors import UsageError
from forge.workspace import find_workspace
from conftest import require

FILES = {
    "forge.toml": "",
    ".gitignore": "forge-out/\n*.log\n",
    "lib/BUILD": """\
        load("//tools:defs.bzl", "stamp")
        filegroup(name = "data", srcs = glob(["data/*.txt"]))
        genrule(name = "upper", srcs = [":data"], outs = ["upper.txt"],
                cmd = "cat $(SRCS) | tr a-z A-Z > $@")
        stamp(name = "stamped", src = "version.txt")
        """,
    "lib/data/a.txt": "a\n",
    "lib/data/b.txt": "b\n",
    "lib/version.txt": "1\n",
    "app/BUILD": """\
        genrule(name = "app", srcs = ["main.txt", "//lib:upper"], outs = ["app.txt"],
                cmd = "cat $(SRCS) > $@")
        genrule(name = "alone", srcs = ["alone.txt"], outs = ["alone.out"], cmd = "cp $< $@")
        genrule(name = "by_hand", srcs = ["main.txt"], outs = ["by_hand.out"], cmd = "cp $< $@",
                tags = ["manual"])
        """,
    "app/main.txt": "main\n",
    "app/alone.txt": "alone\n",
    "pics/BUILD": 'filegroup(name = "all", srcs = glob(["**"]))\n',
    "pics/x.txt": "x\n",
    "pics/sub/y.txt": "y\n",
    # tools/ is no package: its .bzl files are loaded by label all the same
    "tools/defs.bzl": """\
        load("//tools:common.bzl", "CMD")
        def stamp(name, src):
            native.genrule(name = name, srcs = [src], outs = [name + ".txt"], cmd = CMD)
        """,
    "tools/common.bzl": 'CMD = "cp $< $@"\n',
    "docs/readme.md": "not in any package\n",
}
EVERY = ["//app:alone", "//app:app", "//lib:data", "//lib:stamped", "//lib:upper", "//pics:all"]


def git(root: Path, *args: str) -> str:
    env = dict(os.environ, GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    return subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


class Repo:
    """A git repository whose workspace is `ws` (the repository root or a directory in it)."""

    def __init__(self, top: Path, ws: Path):
        self.top, self.ws = top, ws

    def write(self, files: dict[str, str]) -> None:
        for rel, text in files.items():
            p = self.ws / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(textwrap.dedent(text))

    def remove(self, *rels: str) -> None:
        for rel in rels:
            (self.ws / rel).unlink()

    def commit(self, message: str = "change") -> str:
        git(self.top, "add", "-A")
        git(self.top, "commit", "-q", "--allow-empty", "-m", message)
        return git(self.top, "rev-parse", "HEAD")

    def affected(self, base: str, head: str | None = "HEAD", patterns=("//...",)) -> dict[str, str]:
        r = find_affected(find_workspace(self.ws), list(patterns), base, head, cwd=self.ws)
        return {str(lb): why for lb, (kind, why) in r.targets.items()}

    def forge(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, FORGE_SERVER="0")
        return subprocess.run([sys.executable, "-m", "forge", *args], cwd=cwd or self.ws, env=env,
                              capture_output=True, text=True, timeout=120)


def make_repo(tmp_path: Path, sub: str = "") -> tuple[Repo, str]:
    require(shutil.which("git") is not None, "git is not installed")
    top = tmp_path / "repo"
    repo = Repo(top, top / sub if sub else top)
    repo.write(FILES)
    git(top, "init", "-q", "-b", "main")
    return repo, repo.commit("base")


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path)


def test_nothing_changed(repo):
    r, base = repo
    assert r.affected(base) == {}
    assert r.affected(base, head=None) == {}


def test_an_edit_reaches_the_targets_that_depend_on_it(repo):
    r, base = repo
    r.write({"lib/data/a.txt": "A\n"})
    r.commit()
    assert r.affected(base) == {"//lib:data": "lib/data/a.txt changed",
                                "//lib:upper": "lib/data/a.txt changed",  # its action reads it
                                "//app:app": "depends on //lib:upper"}


def test_a_file_a_glob_now_sees(repo):
    r, base = repo
    r.write({"lib/data/c.txt": "c\n"})
    r.commit()
    assert sorted(r.affected(base)) == ["//app:app", "//lib:data", "//lib:upper"]
    assert r.affected(base)["//lib:data"] == "lib/data/c.txt added"


def test_a_deleted_file_counts_for_the_targets_that_had_it(repo):
    r, base = repo
    r.remove("lib/data/b.txt")
    r.commit()
    got = r.affected(base)
    assert sorted(got) == ["//app:app", "//lib:data", "//lib:upper"]
    assert got["//lib:data"] == "lib/data/b.txt deleted"


def test_a_rename_counts_both_paths(repo):
    r, base = repo
    git(r.top, "mv", "lib/data/a.txt", "lib/data/z.txt")  # still globbed: the new path counts
    head1 = r.commit()
    assert r.affected(base, head1)["//lib:data"] == "lib/data/z.txt added"
    git(r.top, "mv", "lib/data/z.txt", "pics/z.txt")  # out of lib: the old path counts
    head2 = r.commit()
    got = r.affected(head1, head2)
    assert sorted(got) == ["//app:app", "//lib:data", "//lib:upper", "//pics:all"]
    assert got["//lib:data"] == "lib/data/z.txt deleted"
    assert got["//pics:all"] == "pics/z.txt added"


def test_a_build_change_affects_its_whole_package(repo):
    r, base = repo
    r.write({"app/BUILD": FILES["app/BUILD"] + "# a comment\n"})
    r.commit()
    assert r.affected(base) == {"//app:alone": "app/BUILD changed", "//app:app": "app/BUILD changed"}
    # a manual target is reported only when named, as `forge build` builds it
    assert r.affected(base, patterns=["//app:by_hand", "//lib/..."]) == \
        {"//app:by_hand": "app/BUILD changed"}


def test_a_target_deleted_at_head_is_not_reported(repo):
    r, base = repo
    r.write({"app/BUILD": textwrap.dedent(FILES["app/BUILD"]).replace(
        'genrule(name = "alone", srcs = ["alone.txt"], outs = ["alone.out"], cmd = "cp $< $@")\n',
        "")})
    r.remove("app/alone.txt")
    r.commit()
    assert sorted(r.affected(base)) == ["//app:app"]


def test_a_bzl_change_reaches_every_package_loading_it_transitively(repo):
    r, base = repo
    r.write({"tools/common.bzl": 'CMD = "cat $< > $@"\n'})
    r.commit()
    got = r.affected(base)
    assert sorted(got) == ["//app:app", "//lib:data", "//lib:stamped", "//lib:upper"]
    assert got["//lib:stamped"] == "tools/common.bzl changed"


def test_files_outside_any_package_or_the_inputs_affect_nothing(repo):
    r, base = repo
    r.write({"docs/readme.md": "edited\n", "tools/notes.txt": "new\n", "README": "hi\n"})
    r.commit()
    assert r.affected(base) == {}
    p = r.forge("affected", "--base", base)
    assert p.returncode == 0 and p.stdout == "", p.stderr
    assert "0 targets affected by 3 changed files" in p.stderr


def test_forge_toml_and_forge_lock_affect_everything(repo):
    r, base = repo
    r.write({"forge.toml": "salt = \"2\"\n"})
    r.commit()
    got = r.affected(base)
    assert sorted(got) == EVERY and set(got.values()) == {"forge.toml changed"}
    r.write({"forge.lock": '{"version": 1, "pins": {}}\n'})
    head = r.commit()
    assert r.affected(f"{head}~1")["//pics:all"] == "forge.lock added"


def test_a_new_build_file_moves_files_out_of_a_glob(repo):
    r, base = repo
    r.write({"pics/sub/BUILD": 'filegroup(name = "sub", srcs = ["y.txt"])\n'})
    r.commit()
    assert r.affected(base) == {"//pics:all": "pics/sub/y.txt is no longer one of its inputs",
                                "//pics/sub:sub": "pics/sub/BUILD added"}
    r.remove("pics/sub/BUILD")
    head = r.commit()
    assert r.affected(f"{head}~1") == {"//pics:all": "pics/sub/y.txt is now one of its inputs"}


def test_the_working_tree_with_untracked_files_but_not_ignored_ones(repo):
    r, base = repo
    r.write({"app/main.txt": "edited, not committed\n"})
    assert sorted(r.affected(base, head=None)) == ["//app:app"]
    assert r.affected(base) == {}  # HEAD itself did not change
    r.write({"app/main.txt": FILES["app/main.txt"], "pics/new.txt": "untracked\n",
             "pics/debug.log": "ignored\n"})
    assert r.affected(base, head=None) == {"//pics:all": "pics/new.txt added"}
    (r.ws / "pics/new.txt").unlink()
    r.remove("lib/data/a.txt")  # a deletion makes the base count too; debug.log still ignored
    assert sorted(r.affected(base, head=None)) == ["//app:app", "//lib:data", "//lib:upper"]


def test_files_read_while_planning(tmp_path):
    """A container_image reads its Dockerfile while planning and looks for a .dockerignore:
    the Dockerfile and the .dockerignore, even when it did not exist, are inputs."""
    repo, base = make_repo(tmp_path)
    repo.write({"img/BUILD": 'container_image(name = "img", srcs = glob(["**"]))\n',
                "img/Dockerfile": "FROM scratch\nCOPY a.txt /a.txt\n", "img/a.txt": "a\n"})
    base = repo.commit()
    repo.write({".dockerignore": "*.md\n", "img/.dockerignore": "*.md\n"})
    repo.commit()
    assert repo.affected(base) == {"//img:img": "img/.dockerignore added"}


def test_a_workspace_in_a_subdirectory_of_the_repository(tmp_path):
    repo, base = make_repo(tmp_path, sub="examples/ws")
    (repo.top / "outside.txt").write_text("not the workspace's\n")
    repo.write({"app/alone.txt": "edited\n"})
    repo.commit()
    assert repo.affected(base) == {"//app:alone": "app/alone.txt changed"}
    p = repo.forge("affected", "--base", base, "--head", "HEAD", ":all", cwd=repo.ws / "app")
    assert p.returncode == 0 and p.stdout == "//app:alone\n", p.stderr


def test_json_output_and_the_build_idiom(repo):
    r, base = repo
    r.write({"app/alone.txt": "edited\n", "docs/readme.md": "edited\n"})
    head = r.commit()
    p = r.forge("affected", "--base", base, "--output", "json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {
        "base": base, "head": None,
        "changed": [{"path": "app/alone.txt", "status": "changed"},
                    {"path": "docs/readme.md", "status": "changed"}],
        "targets": [{"label": "//app:alone", "kind": "genrule", "why": "app/alone.txt changed"}]}
    assert json.loads(r.forge("affected", "--base", base, "--head", head,
                              "--output", "json").stdout)["head"] == head
    labels = r.forge("affected", "--base", base).stdout.split()
    cache = ["--cache-dir", str(r.top.parent / "cache")]
    built = r.forge("build", *cache, *labels)
    assert built.returncode == 0 and built.stdout == "forge-out/app/alone.out\n", built.stderr
    nothing = r.forge("build", *cache)  # `forge build $(forge affected ...)`, nothing affected
    assert nothing.returncode == 0 and nothing.stdout == ""
    assert "no targets given, nothing to build" in nothing.stderr
    junit = r.top.parent / "junit.xml"
    assert r.forge("test", *cache, "--junit", str(junit)).returncode == 0
    assert 'tests="0"' in junit.read_text()  # an empty report for the CI step that reads it


def test_errors_are_clear(repo, tmp_path):
    r, base = repo
    p = r.forge("affected", "--base", "no-such-branch")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "error: 'no-such-branch' is not a commit of the git repository" in p.stderr
    p = r.forge("affected", "--base", base, "--head", "nope~3")
    assert p.returncode == 2 and "'nope~3' is not a commit" in p.stderr
    p = r.forge("affected")
    assert p.returncode == 2 and "--base" in p.stderr
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "forge.toml").write_text("")
    p = r.forge("affected", "--base", "main", cwd=lone)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"error: the workspace {lone} is not in a git repository" in p.stderr
    with pytest.raises(UsageError, match="not a git revision"):
        find_affected(find_workspace(r.ws), ["//..."], "--all")


def test_a_broken_head_is_an_error_and_a_broken_base_a_warning(repo):
    r, base = repo
    r.write({"app/BUILD": "genrule(name = \n"})
    broken = r.commit()
    p = r.forge("affected", "--base", base, "--head", broken)
    assert p.returncode == 2 and f"{broken}:app/BUILD:" in p.stderr, p.stderr
    r.write({"app/BUILD": FILES["app/BUILD"]})
    r.remove("pics/x.txt")  # a deletion: the (broken) base is loaded
    fixed = r.commit()
    p = r.forge("affected", "--base", broken, "--head", fixed)
    assert p.returncode == 0 and f"WARNING: the workspace at {broken} cannot be loaded" in p.stderr
    assert p.stdout.split() == EVERY


def test_a_deleted_source_still_named_lists_its_target(repo):
    """CI must build (and so report) a target whose named input vanished, not fail to
    say what to build."""
    r, base = repo
    r.remove("app/alone.txt")
    r.commit()
    assert r.affected(base) == {"//app:alone": "app/alone.txt deleted"}
    p = r.forge("affected", "--base", "HEAD~1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["//app:alone"]
    b = r.forge("build", "//app:alone")
    assert b.returncode != 0 and "alone.txt" in b.stderr and "Traceback" not in b.stderr
