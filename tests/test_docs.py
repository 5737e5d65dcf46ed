"""The documentation stays true: generated parts are regenerated, examples build."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from forge.cli import COMMANDS, _parser
from forge.docgen import REGENERATE, rules_markdown

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "basic"


def test_rules_reference_is_generated_from_the_schemas():
    assert (REPO / "docs" / "rules.md").read_text() == rules_markdown(), \
        f"docs/rules.md is out of date: run `{REGENERATE}`"


def test_build_example_is_the_example_workspace_root_build_file():
    assert (REPO / "BUILD.example").read_text() == (EXAMPLE / "BUILD").read_text(), \
        "BUILD.example and examples/basic/BUILD differ: edit BUILD.example, then " \
        "`cp BUILD.example examples/basic/BUILD`"


def _forge(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forge", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_example_workspace_builds_and_its_tests_pass(tmp_path):
    ws = tmp_path / "basic"
    shutil.copytree(EXAMPLE, ws, ignore=shutil.ignore_patterns("forge-out"))
    cache = str(tmp_path / "cache")
    build = _forge(["build", "//...", "--cache-dir", cache], ws)
    assert build.returncode == 0, build.stderr
    assert "forge-out/lib/about.txt" in build.stdout.split()
    test = _forge(["test", "//...", "--cache-dir", cache], ws)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "PASSED" in test.stdout


def test_cli_reference_names_every_command_and_flag():
    text = (REPO / "docs" / "cli.md").read_text()
    missing = [f"`forge {name}`" for name in COMMANDS if f"forge {name}" not in text]

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{command} {name}")
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and \
                        not re.search(rf"(?<![\w-]){flag}(?![\w-])", text):
                    missing.append(f"{flag} of {command}")
    walk(_parser(), "forge")
    assert not missing, "docs/cli.md does not mention: " + ", ".join(missing)


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash dev/test.sh" in readme
    assert "bash dev/test.sh" in ci


def test_writing_rules_example_family_registers_plans_and_runs(tmp_path):
    """docs/writing-rules.md says its family is complete and works as shown."""
    import types

    from forge.analysis import Analyzer
    from forge.cache import Cache
    from forge.executor import LocalExecutor
    from forge.labels import parse_pattern
    from forge.records import Records
    from forge.ruleset import RuleSet
    from forge.scheduler import Scheduler
    from forge.workspace import Workspace
    text = (REPO / "docs" / "writing-rules.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def register" in b)
    module = types.ModuleType("text_rules_example")
    exec(compile(source, "writing-rules.md", "exec"), module.__dict__)
    rules = RuleSet()
    module.register(rules)
    assert sorted(rules.rules) == ["sorted_lines", "template"] and rules.pools == {"sort": 2}
    root = tmp_path / "ws"
    root.mkdir()
    (root / "forge.toml").write_text("")
    (root / "x.txt").write_text("b\na\nb\n")
    (root / "t.in").write_text("hello {who}\n")
    (root / "BUILD").write_text(next(b for b in re.findall(r"```python\n(.*?)```", text, re.S)
                                     if b.startswith("sorted_lines(")))
    an = Analyzer(Workspace(root), rules)
    plan = an.analyze(an.expand([parse_pattern("//...")]))
    cache = Cache(tmp_path / "cache")
    local = LocalExecutor(root, cache, Records(tmp_path / "records"), rules=rules)
    summary = Scheduler(local, jobs=2, pools=rules.pools).run(plan.actions)
    cache.close()
    assert summary.ok, [r.error for r in summary.results]
    assert (root / "forge-out/s.txt").read_text() == "a\nb\n"
    assert (root / "forge-out/t.out").read_text() == "hello you\n"
