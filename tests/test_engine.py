"""Engine behaviour through the real CLI: caching, early cutoff, failures, sandbox."""

from __future__ import annotations

import json
import os



def counted_defs(ws) -> dict[str, str]:
    """A macro whose commands log their target name, so tests count real runs."""
    return {"tools/BUILD": "", "tools/defs.bzl": f'''
        def counted(name, srcs, cmd, outs = None):
            native.genrule(
                name = name,
                srcs = srcs,
                outs = outs or [name + ".out"],
                cmd = "echo {{}} >> {ws.calls}; ".format(name) + cmd,
            )
        '''}


def diamond(ws):
    ws.write(counted_defs(ws))
    ws.write({
        "a/src.txt": "alpha\n",
        "a/other.txt": "other\n",
        "a/BUILD": '''
            load("//tools:defs.bzl", "counted")
            counted(name = "left", srcs = ["src.txt"], cmd = "cat $< > $@")
            counted(name = "right", srcs = ["other.txt"], cmd = "tr a-z A-Z < $< > $@")
            counted(name = "top", srcs = [":left", ":right"], cmd = "cat $(SRCS) > $@")
        ''',
        "b/BUILD": '''
            load("//tools:defs.bzl", "counted")
            counted(name = "user", srcs = ["//a:top.out"], cmd = "wc -l < $< > $@")
        ''',
    })


def test_second_build_runs_nothing(ws):
    diamond(ws)
    r = ws.build("//...")
    assert r.code == 0, r.err
    assert ws.take_calls() == ["left", "right", "top", "user"]
    assert ws.out("a/top.out") == "alpha\nOTHER\n"
    assert ws.out("b/user.out").strip() == "2"
    r = ws.build("//...")
    assert r.code == 0, r.err
    assert ws.take_calls() == []
    assert r.err.strip().splitlines()[-1] == "forge: 4 actions: 0 executed, 4 cached"
    assert [e["status"] for e in r.event_list[:-1]] == ["cached"] * 4


def test_touching_a_source_reruns_exactly_its_dependents(ws):
    diamond(ws)
    assert ws.build("//...").code == 0
    ws.take_calls()
    (ws.root / "a/other.txt").write_text("changed\n")
    r = ws.build("//...")
    assert r.code == 0, r.err
    assert ws.take_calls() == ["right", "top", "user"]
    assert ws.executed(r) == ["//a:right", "//a:top", "//b:user"]
    assert ws.out("a/top.out") == "alpha\nCHANGED\n"


def test_identical_output_stops_the_rebuild(ws):
    ws.write(counted_defs(ws))
    ws.write({"p/in.txt": "keep\nnoise 1\n", "p/BUILD": '''
        load("//tools:defs.bzl", "counted")
        counted(name = "first", srcs = ["in.txt"], cmd = "head -n1 $< > $@")
        counted(name = "second", srcs = [":first"], cmd = "cat $< $< > $@")
    '''})
    assert ws.build("//p:second").code == 0
    assert ws.take_calls() == ["first", "second"]
    (ws.root / "p/in.txt").write_text("keep\nnoise 2\n")
    r = ws.build("//p:second")
    assert ws.take_calls() == ["first"]
    statuses = {e["label"]: e["status"] for e in r.event_list if e["type"] == "action"}
    assert statuses == {"//p:first": "executed", "//p:second": "cached"}


def test_keep_going_builds_independent_actions(ws):
    ws.write(counted_defs(ws))
    ws.write({"p/BUILD": '''
        load("//tools:defs.bzl", "counted")
        counted(name = "bad", srcs = [], cmd = "echo broken >&2; exit 7")
        counted(name = "after_bad", srcs = [":bad"], cmd = "cat $< > $@")
        counted(name = "good1", srcs = [], cmd = "sleep 0.3; echo 1 > $@")
        counted(name = "good2", srcs = [":good1"], cmd = "cat $< > $@")
    '''})
    r = ws.build("//...", "-k", "-j", "2")
    assert r.code == 1
    calls = ws.take_calls()
    assert "after_bad" not in calls and {"bad", "good1", "good2"} <= set(calls)
    assert "exit code 7" in r.err and "broken" in r.err and "scratch directory kept at" in r.err
    statuses = {e["label"]: e["status"] for e in r.event_list if e["type"] == "action"}
    assert statuses["//p:after_bad"] == "skipped" and statuses["//p:good2"] == "executed"
    assert r.event_list[-1] == {"type": "build_finished", "exit_code": 1, "executed": 2,
                                "cached": 0, "failed": 1}


def test_without_keep_going_stops_starting_work(ws):
    ws.write(counted_defs(ws))
    chain = "\n".join(f'counted(name = "c{i}", srcs = [":c{i-1}"], cmd = "cat $< > $@")'
                      for i in range(1, 6))
    ws.write({"p/BUILD": 'load("//tools:defs.bzl", "counted")\n'
              'counted(name = "bad", srcs = [], cmd = "exit 1")\n'
              'counted(name = "c0", srcs = [], cmd = "sleep 0.5; echo > $@")\n' + chain})
    r = ws.build("//...", "-j", "2")
    assert r.code == 1
    assert "c5" not in ws.take_calls()


def test_many_workers_wide_graph(ws):
    targets = "\n".join(f'genrule(name = "w{i}", srcs = ["seed.txt"], outs = ["w{i}.txt"], '
                        f'cmd = "cat $< > $@; echo {i} >> $@")' for i in range(60))
    ws.write({"p/seed.txt": "seed\n", "p/BUILD": targets + '\ngenrule(name = "all", '
              'srcs = [' + ", ".join(f'":w{i}"' for i in range(60)) + '], outs = ["all.txt"], '
              'cmd = "cat $(SRCS) > $@")\n'})
    r = ws.build("//p:all", "-j", "8")
    assert r.code == 0, r.err
    expected = "".join(f"seed\n{i}\n" for i in range(60))
    assert ws.out("p/all.txt") == expected
    assert ws.build("//p:all", "-j", "8").err.strip().endswith("0 executed, 61 cached")


def test_salt_changes_every_key(ws):
    diamond(ws)
    assert ws.build("//...").code == 0
    ws.take_calls()
    (ws.root / "forge.toml").write_text('salt = "generation-2"\n')
    assert ws.build("//...").code == 0
    assert ws.take_calls() == ["left", "right", "top", "user"]


def test_outputs_are_read_only_links_and_printed(ws):
    diamond(ws)
    r = ws.build("//a:top")
    assert r.out.split() == ["forge-out/a/top.out"]
    st = (ws.root / "forge-out/a/top.out").stat()
    assert not st.st_mode & 0o222
    assert st.st_nlink >= 2  # hard link into the CAS


def test_deleted_output_is_restored_from_cache(ws):
    diamond(ws)
    assert ws.build("//...").code == 0
    ws.take_calls()
    (ws.root / "forge-out/a/top.out").unlink()
    r = ws.build("//...")
    assert ws.take_calls() == []
    assert ws.out("a/top.out") == "alpha\nOTHER\n"


def test_corrupt_blob_is_rebuilt_with_a_warning(ws):
    diamond(ws)
    assert ws.build("//a:left").code == 0
    ws.take_calls()
    blob = os.path.realpath(ws.root / "forge-out/a/left.out")
    # Find the CAS blob (same inode), corrupt it, and drop the workspace link.
    ino = os.stat(ws.root / "forge-out/a/left.out").st_ino
    blobs = [p for p in (ws.cache / "cas").rglob("*") if p.is_file() and p.stat().st_ino == ino]
    assert blobs, blob
    os.chmod(blobs[0], 0o644)
    blobs[0].write_text("garbage\n")
    (ws.root / "forge-out/a/left.out").unlink()
    r = ws.build("//a:left")
    assert r.code == 0, r.err
    assert "WARNING" in r.err and "rebuilding" in r.err
    assert ws.take_calls() == ["left"]
    assert ws.out("a/left.out") == "alpha\n"


def test_missing_declared_output_fails(ws):
    ws.write({"p/BUILD": 'genrule(name = "x", outs = ["x.txt", "y.txt"], cmd = "touch $(OUTS) && rm forge-out/p/y.txt")'})
    r = ws.build("//p:x")
    assert r.code == 1
    assert "declared output forge-out/p/y.txt not created by the action" in r.err


def test_sandbox_holds_only_declared_inputs_and_a_clean_env(ws):
    ws.write({"p/declared.txt": "d\n", "p/undeclared.txt": "u\n", "p/BUILD": '''
        genrule(
            name = "probe",
            srcs = ["declared.txt"],
            outs = ["probe.txt"],
            cmd = "ls p > $@; echo $$TZ $$LC_ALL $$SOURCE_DATE_EPOCH $$PATH >> $@; "
                  + "[ $$HOME = $$PWD ] && echo scratch-home >> $@; echo $${MY_VAR:-unset} >> $@; touch stray.txt",
        )
    '''})
    r = ws.build("//p:probe", env={"MY_VAR": "leaked", "TZ": "Europe/Paris"})
    assert r.code == 0, r.err
    lines = ws.out("p/probe.txt").splitlines()
    assert lines[0] == "declared.txt"
    assert lines[1] == "UTC C.UTF-8 315532800 /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert lines[2:] == ["scratch-home", "unset"]
    assert not (ws.root / "forge-out/p/stray.txt").exists()


def test_explain_says_which_input_changed(ws):
    diamond(ws)
    assert ws.build("//...").code == 0
    r = ws.forge("explain", "//a:left")
    assert "no earlier record" in r.out
    (ws.root / "a/src.txt").write_text("beta\n")
    assert ws.build("//...").code == 0
    r = ws.forge("explain", "//a:left")
    assert r.code == 0
    assert "input changed: a/src.txt" in r.out
    r = ws.forge("explain")
    assert "Genrule //a:right: up to date" in r.out
    # A changed command is named as such.
    (ws.root / "a/BUILD").write_text((ws.root / "a/BUILD").read_text().replace("cat $< > $@", "cat $< $< > $@"))
    assert ws.build("//a:left").code == 0
    assert "the command changed" in ws.forge("explain", "//a:left").out


def test_build_events_and_profile(ws, tmp_path):
    diamond(ws)
    prof = tmp_path / "trace.json"
    r = ws.build("//b:user", "--profile", str(prof))
    assert r.code == 0
    actions = [e for e in r.event_list if e["type"] == "action"]
    assert {a["label"] for a in actions} == {"//a:left", "//a:right", "//a:top", "//b:user"}
    for a in actions:
        # ran_on: where an executed action ran (here, every one: this is a clean build)
        assert set(a) == {"type", "label", "mnemonic", "key", "status", "duration_s", "outputs",
                          "ran_on"}
        assert a["mnemonic"] == "Genrule" and len(a["key"]) == 32 and a["ran_on"] == "local"
    assert actions[-1]["outputs"] == ["forge-out/b/user.out"]
    trace = json.loads(prof.read_text())
    names = {e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert "Genrule //b:user" in names and "load+analyse" in names


def test_cache_dir_resolution_order(ws, tmp_path):
    diamond(ws)
    env_dir, cfg_dir, flag_dir = tmp_path / "env", tmp_path / "cfg", tmp_path / "flag"
    (ws.root / "forge.toml").write_text(f'[cache]\ndir = "{cfg_dir}"\n')
    import subprocess, sys
    def run(*extra, env=None):
        e = dict(os.environ, HOME=str(tmp_path / "home"))
        e.pop("FORGE_CACHE_DIR", None)
        e.update(env or {})
        return subprocess.run([sys.executable, "-m", "forge", "build", "//a:left", *extra],
                              cwd=ws.root, env=e, capture_output=True, text=True)
    assert run().returncode == 0 and (cfg_dir / "cas").is_dir()
    assert run(env={"FORGE_CACHE_DIR": str(env_dir)}).returncode == 0 and (env_dir / "cas").is_dir()
    assert run("--cache-dir", str(flag_dir), env={"FORGE_CACHE_DIR": str(env_dir)}).returncode == 0
    assert (flag_dir / "cas").is_dir()
    (ws.root / "forge.toml").write_text("")
    assert run().returncode == 0 and (tmp_path / "home/.cache/forge/cas").is_dir()


def test_cache_stats_and_gc(ws):
    diamond(ws)
    assert ws.build("//...").code == 0
    r = ws.forge("cache", "stats")
    assert r.code == 0 and "blobs: 4" in r.out and "action records: 4" in r.out
    r = ws.forge("cache", "gc", "--max-size", "0")
    assert r.code == 0 and "removed 4 blobs" in r.out
    assert "blobs: 0" in ws.forge("cache", "stats").out
    ws.take_calls()
    (ws.root / "forge-out").chmod(0o755)
    ws.forge("clean")
    assert ws.build("//...").code == 0
    assert ws.take_calls() == ["left", "right", "top", "user"]


def test_clean_and_expunge(ws):
    diamond(ws)
    assert ws.build("//...").code == 0
    assert ws.forge("clean").code == 0
    assert not (ws.root / "forge-out").exists()
    r = ws.build("//...")
    assert r.err.strip().endswith("0 executed, 4 cached")  # outputs come back from the cache
    assert ws.forge("clean", "--expunge").code == 0
    assert ws.forge("explain").code == 2


def test_sh_test_pass_and_fail(ws, tmp_path):
    ws.write({"t/data.txt": "42\n",
              "t/pass.sh": "#!/bin/sh\ngrep -q 42 t/data.txt\n",
              "t/fail.sh": "#!/bin/sh\necho 'expected 43' ; exit 1\n",
              "t/BUILD": '''
        sh_test(name = "pass", srcs = ["pass.sh"], data = ["data.txt"])
        sh_test(name = "fail", srcs = ["fail.sh"])
    '''})
    r = ws.forge("test", "//t:pass")
    assert r.code == 0, r.err + r.out
    assert "PASSED" in r.out
    junit = tmp_path / "junit.xml"
    r = ws.forge("test", "//t:all", "--junit", str(junit))
    assert r.code == 3
    assert "FAILED" in r.out and "expected 43" in r.out
    assert 'failures="1"' in junit.read_text()


def test_forge_test_runs_as_many_tests_at_once_as_jobs_in_forge_toml_says(ws, tmp_path):
    log = tmp_path / "tests.log"

    def most_at_once() -> int:
        now = most = 0
        for line in log.read_text().split():
            now += 1 if line == "start" else -1
            most = max(most, now)
        log.unlink()
        return most
    ws.write({"forge.toml": "jobs = 1\n",
              "t/slow.sh": '#!/bin/sh\necho start >> "$LOG"; sleep 0.5; echo end >> "$LOG"\n',
              "t/BUILD": "\n".join(f'sh_test(name = "s{i}", srcs = ["slow.sh"], env = {{"LOG": "{log}"}})'
                                   for i in range(3))})
    r = ws.forge("test", "//t:all")
    assert r.code == 0, r.err + r.out
    assert most_at_once() == 1
    r = ws.forge("test", "//t:all", "-j", "3")  # the command line wins
    assert r.code == 0, r.err + r.out
    assert most_at_once() >= 2


def test_dependency_cycle_is_reported_as_a_path(ws):
    ws.write({"a/BUILD": 'genrule(name = "x", srcs = ["//b:y"], outs = ["x.o"], cmd = "true")',
              "b/BUILD": 'genrule(name = "y", srcs = ["//a:x"], outs = ["y.o"], cmd = "true")'})
    r = ws.forge("build", "//a:x")
    assert r.code == 2
    assert "dependency cycle: //a:x -> //b:y -> //a:x" in r.err
    assert "Traceback" not in r.err


def test_nested_workspace_is_not_a_package(ws):
    ws.write({"p/BUILD": 'genrule(name = "x", outs = ["x.o"], cmd = "echo > $@")',
              "inner/forge.toml": "", "inner/BUILD": 'genrule(name = "y", outs = ["y.o"], cmd = "exit 1")'})
    r = ws.build("//...")
    assert r.code == 0, r.err
    assert r.err.strip().endswith("1 executed, 0 cached")


def test_glob_and_source_file_labels(ws):
    ws.write({"p/a.txt": "a\n", "p/b.txt": "b\n", "p/skip.txt": "s\n", "p/sub/c.txt": "c\n",
              "p/sub2/BUILD": "", "p/sub2/hidden.txt": "h\n",
              "p/BUILD": '''
        genrule(name = "cat", srcs = glob(["**/*.txt"], exclude = ["skip.txt"]),
                outs = ["cat.out"], cmd = "cat $(SRCS) > $@")
    ''', "q/BUILD": 'genrule(name = "use", srcs = ["//p:a.txt", "//p:cat.out"], outs = ["u"], cmd = "cat $(SRCS) > $@")'})
    assert ws.build("//q:use").code == 0
    assert ws.out("p/cat.out") == "a\nb\nc\n"
    assert ws.out("q/u") == "a\na\nb\nc\n"
    (ws.root / "p/d.txt").write_text("d\n")  # a new file matching the glob
    assert ws.build("//q:use").code == 0
    assert ws.out("p/cat.out") == "a\nb\nd\nc\n" or ws.out("p/cat.out") == "a\nb\nc\nd\n"


def test_location_expansion_and_tools(ws):
    ws.write({"tools/BUILD": 'genrule(name = "gen", outs = ["gen.sh"], executable = True, '
                             'cmd = "printf \'#!/bin/sh\\\\necho from-tool\\\\n\' > $@")',
              "p/BUILD": '''
        genrule(name = "use", tools = ["//tools:gen"], outs = ["o.txt"],
                cmd = "$(location //tools:gen) > $@")
    '''})
    r = ws.build("//p:use")
    assert r.code == 0, r.err
    assert ws.out("p/o.txt") == "from-tool\n"


def test_nobuild_only_analyses(ws):
    diamond(ws)
    r = ws.forge("build", "--nobuild", "//...")
    assert r.code == 0 and "4 actions planned" in r.err
    assert not (ws.root / "forge-out").exists()


def test_query_and_graph_commands(ws):
    diamond(ws)
    r = ws.forge("query", "deps(//b:user)")
    assert r.code == 0, r.err
    assert set(r.out.split()) >= {"//a:left", "//a:top", "//a:top.out", "//a:src.txt", "//b:user"}
    r = ws.forge("query", "rdeps(//..., //a:src.txt)")
    assert set(r.out.split()) == {"//a:src.txt", "//a:left", "//a:top", "//a:top.out", "//b:user"}
    r = ws.forge("query", "kind(genrule, //...) - //a:left", "--output", "json")
    labels = {t["label"] for t in json.loads(r.out)}
    assert r.code == 0 and "//a:right" in labels and "//a:left" not in labels
    r = ws.forge("query", "somepath(//b:user, //a:src.txt)")
    assert r.out.split() == ["//a:left", "//a:src.txt", "//a:top", "//a:top.out", "//b:user"]
    r = ws.forge("graph", "//b:user", "--format", "mermaid")
    assert r.code == 0 and r.out.startswith("graph LR")
    r = ws.forge("graph", "//b:user")
    assert r.out.startswith("digraph") and '"//b:user" -> "//a:top.out"' in r.out


def test_gc_then_incremental_build_still_works(ws):
    diamond(ws)
    assert ws.build("//...").code == 0
    assert ws.forge("cache", "gc", "--max-size", "0").code == 0
    (ws.root / "b/BUILD").write_text((ws.root / "b/BUILD").read_text().replace("wc -l", "wc -c"))
    r = ws.build("//...")
    assert r.code == 0, r.err
    assert ws.out("b/user.out").strip() == str(len("alpha\nOTHER\n"))


def test_a_command_that_writes_to_its_input_fails(ws):
    ws.write({"p/words.txt": "safe\n", "p/BUILD": '''
        genrule(name = "evil", srcs = ["words.txt"], outs = ["o"], cmd = "echo EVIL >> $<; cp $< $@")
    '''})
    r = ws.build("//p:evil")
    assert r.code == 1
    assert "the command wrote to its input p/words.txt" in r.err


def test_run_passes_arguments_after_double_dash(ws):
    ws.write({"p/BUILD": '''
        genrule(name = "tool", outs = ["tool.sh"], executable = True,
                cmd = "printf '#!/bin/sh\\\\necho ran \\"$$@\\"\\\\n' > $@")
    '''})
    r = ws.forge("run", "//p:tool", "--", "a", "--", "b")
    assert r.code == 0, r.err
    assert r.out.strip() == "ran a -- b"
    assert ws.forge("help", "frob").err.startswith("error: no command 'frob'")
