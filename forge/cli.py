"""The command line: the only place that prints and chooses exit codes.

Heavy modules are imported inside the commands so `forge --version` and
`forge help` stay fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from forge import __version__
from forge.errors import (EXIT_BUILD_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK,
                          EXIT_TESTS_FAILED, EXIT_USAGE, ForgeError, UsageError, disk_full,
                          format_error, full_path, human_size, is_disk_full)

MAX_PRINTED = 100  # output paths printed by `forge build`; more are summarised

COMMANDS = {
    "build": "build targets and print their output paths",
    "test": "build test targets and run them",
    "run": "build a target and run it (an executable, an image, an OS image)",
    "load": "build an image target and load it into the Docker engine under a tag",
    "lock": "resolve every floating reference (image tags) again and rewrite forge.lock",
    "query": "query the target graph: deps(), rdeps(), kind(), attr(), somepath(), + - ^",
    "affected": "the targets a git change touches: forge build $(forge affected --base origin/main)",
    "graph": "draw a target's dependency graph (dot, svg, mermaid)",
    "explain": "why each action of the last build ran",
    "provenance": "build a target and print its SLSA provenance (an in-toto Statement)",
    "clean": "remove outputs (--expunge: also this workspace's records)",
    "cache": "cache stats | cache gc --max-size 10G",
    "keygen": "make a signing key pair: OUT (private, 0600) and OUT.pub",
    "verify": "check a file, a target's outputs or a pushed image against its signature",
    "worker": "run actions for a remote-execution server (BuildGrid's Bots API)",
    "help": "show help for forge or one command",
    "version": "print forge's version",
}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", help="cache location (default: FORGE_CACHE_DIR, "
                        "[cache] dir in forge.toml, ~/.cache/forge)")
    common.add_argument("--debug", action="store_true", help="show Python tracebacks")
    building = argparse.ArgumentParser(add_help=False)
    building.add_argument("-j", "--jobs", type=int, default=None,
                          help="parallel actions and tests (default: jobs in forge.toml, "
                          "else the number of cores)")
    building.add_argument("-k", "--keep-going", action="store_true",
                          help="keep building what does not depend on a failure")
    building.add_argument("--progress", choices=("auto", "plain", "none"), default="auto")
    building.add_argument("--build-events", metavar="FILE", help="write JSON lines, one per action")
    building.add_argument("--profile", metavar="FILE", help="write a Chrome trace of the build")
    building.add_argument("--nobuild", action="store_true", help="load and analyse only")
    building.add_argument("--offline", action="store_true",
                          help="never use the network: fail clearly when something is not cached "
                          "or not pinned in forge.lock")
    building.add_argument("--remote-cache", metavar="URL",
                          help="shared cache: http(s)://host/path (Bazel HTTP cache: nginx, "
                          "bazel-remote) or grpc(s)://host:port (REAPI: BuildGrid, ...); "
                          "default: [remote] cache in forge.toml; empty: none")
    building.add_argument("--remote-upload", action=argparse.BooleanOptionalAction, default=None,
                          help="upload the results of actions that ran here (default: "
                          "[remote] upload, false)")
    building.add_argument("--remote-instance", metavar="NAME", help="REAPI instance name")
    building.add_argument("--remote-timeout", metavar="SECONDS", type=float,
                          help="per-request timeout for the remote cache (default 60)")
    building.add_argument("--sign-key", metavar="KEY", help="sign each output of the targets "
                          "built into OUTPUT.dsse.json with this private key (default: [sign] "
                          "key in forge.toml; empty: do not sign)")
    building.add_argument("--remote-executor", metavar="URL",
                          help="run hermetic actions on a REAPI executor, grpc(s)://host:port "
                          "(BuildGrid); default: [remote] executor in forge.toml; empty: none")
    building.add_argument("--remote-instance-name", metavar="NAME",
                          help="the executor's REAPI instance (default: [remote] "
                          "executor_instance, else --remote-instance)")
    building.add_argument("--remote-local-fallback", action=argparse.BooleanOptionalAction,
                          default=None, help="run an action here when the executor fails "
                          "(default: [remote] local_fallback, true)")

    p = argparse.ArgumentParser(prog="forge", description="forge: builds OS images from BUILD files, "
                                "caching every step by the content of its inputs.")
    p.add_argument("--version", action="version", version=f"forge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser("build", parents=[common, building], help=COMMANDS["build"])
    b.add_argument("patterns", nargs="*", metavar="TARGET", help="targets or patterns "
                   "(//... for all); with none, nothing is built")
    b.add_argument("--load", metavar="TAG", help="load the built image into the Docker engine "
                   "as TAG (one image target)")
    t = sub.add_parser("test", parents=[common, building], help=COMMANDS["test"])
    t.add_argument("patterns", nargs="*", metavar="TARGET", help="targets or patterns "
                   "(//... for all); with none, nothing is tested")
    t.add_argument("--junit", metavar="FILE", help="write a JUnit XML report")
    r = sub.add_parser("run", parents=[common, building], help=COMMANDS["run"])
    r.add_argument("target", help="the target to run; arguments for it go after -- (options "
                   "forge does not know, e.g. `-p 6379` for an OS image, go to it too)")
    ld = sub.add_parser("load", parents=[common, building], help=COMMANDS["load"])
    ld.add_argument("target")
    ld.add_argument("tag", nargs="?", default="", help="e.g. myrepo/x:dev (default: the "
                    "image's own tag, a linuxkit_package's <org>/<image>:<hash>)")
    lk = sub.add_parser("lock", parents=[common, building], help=COMMANDS["lock"])
    lk.add_argument("patterns", nargs="*", default=["//..."], metavar="TARGET")
    q = sub.add_parser("query", parents=[common], help=COMMANDS["query"])
    q.add_argument("expr")
    q.add_argument("--output", choices=("label", "json", "dot"), default="label")
    af = sub.add_parser("affected", parents=[common], help=COMMANDS["affected"])
    af.add_argument("patterns", nargs="*", default=["//..."], metavar="TARGET",
                    help="report only targets these patterns cover (default //...)")
    af.add_argument("--base", required=True, metavar="REV", help="the git revision to compare "
                    "with, e.g. origin/main")
    af.add_argument("--head", metavar="REV", help="the revision compared (default: the working "
                    "tree, with uncommitted and untracked files)")
    af.add_argument("--output", choices=("label", "json"), default="label")
    g = sub.add_parser("graph", parents=[common], help=COMMANDS["graph"])
    g.add_argument("target")
    g.add_argument("--format", choices=("dot", "svg", "mermaid"), default="dot")
    pv = sub.add_parser("provenance", parents=[common, building], help=COMMANDS["provenance"])
    pv.add_argument("target")
    e = sub.add_parser("explain", parents=[common], help=COMMANDS["explain"])
    e.add_argument("patterns", nargs="*", metavar="TARGET")
    c = sub.add_parser("clean", parents=[common], help=COMMANDS["clean"])
    c.add_argument("--expunge", action="store_true")
    ca = sub.add_parser("cache", parents=[common], help=COMMANDS["cache"])
    casub = ca.add_subparsers(dest="cache_command", metavar="stats|gc", required=True)
    casub.add_parser("stats", parents=[common])
    gc = casub.add_parser("gc", parents=[common])
    gc.add_argument("--max-size", required=True, help="e.g. 10G, 500M")
    kg = sub.add_parser("keygen", help=COMMANDS["keygen"])
    kg.add_argument("out", metavar="OUT", help="where the private key goes; the public one "
                    "goes to OUT.pub")
    kg.add_argument("--type", choices=("ecdsa", "ed25519"), default="ecdsa",
                    help="ECDSA P-256 (default) or Ed25519")
    kg.add_argument("--force", action="store_true", help="replace an existing OUT")
    v = sub.add_parser("verify", parents=[common], help=COMMANDS["verify"])
    v.add_argument("subject", metavar="TARGET|FILE|IMAGE", help="a file or directory (its "
                   "envelope FILE.dsse.json beside it), a target label (its outputs), or an "
                   "image reference in a registry (its attached signatures)")
    v.add_argument("--key", required=True, metavar="PUB", help="the signer's public key (PEM)")
    v.add_argument("--signature", metavar="FILE", help="the DSSE envelope of a FILE, when it "
                   "is not FILE.dsse.json")
    w = sub.add_parser("worker", parents=[common], help=COMMANDS["worker"])
    w.add_argument("--executor", required=True, metavar="URL",
                   help="grpc://host:port or grpcs://host:port of the Bots service")
    w.add_argument("--instance", default="", help="the instance the bot serves (e.g. main)")
    w.add_argument("--platform", action="append", default=[], metavar="KEY=VALUE",
                   help="a platform property the bot offers (repeatable): docker=1")
    w.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="leases run at once (the bot's capacity)")
    w.add_argument("--work-dir", required=True, metavar="DIR",
                   help="lease directories and the local CAS cache")
    w.add_argument("--name", default="", help="the bot id (default: host name and pid)")
    w.add_argument("--max-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="the longest an action may run, whatever it asks (default 3600)")
    h = sub.add_parser("help", help=COMMANDS["help"])
    h.add_argument("topic", nargs="?")
    sub.add_parser("version", help=COMMANDS["version"])
    return p


_PARSER: list = [None]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _PARSER[0] or _PARSER.__setitem__(0, _parser()) or _PARSER[0]  # reused when served
    if not argv:
        parser.print_help()
        return EXIT_OK
    program_args: list[str] = []
    if argv[0] == "run" and "--" in argv:  # what follows `--` belongs to the program
        cut = argv.index("--")
        argv, program_args = argv[:cut], argv[cut + 1:]
    if argv[0] == "run":  # options forge does not know go to the runner: `-p 6379`
        args, extra = parser.parse_known_args(argv)
        program_args = extra + program_args
    else:
        args = parser.parse_args(argv)
    args.program_args = program_args
    if args.command == "version":
        print(f"forge {__version__}")
        return EXIT_OK
    if args.command == "help":
        return _help(parser, args.topic)
    if args.command == "worker":  # serves a remote executor: no workspace
        try:
            return cmd_worker(args)
        except ForgeError as e:
            print(format_error(e, None), file=sys.stderr)
            return e.exit_code
    # SIGTERM stops a build the way Ctrl-C does: running commands killed, cache valid.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    root = None
    try:
        from forge.workspace import find_workspace
        try:
            ws = find_workspace()
        except UsageError:
            # keygen, and verify of a file or an image: a customer has forge, not a workspace
            if not (args.command == "keygen" or args.command == "verify"
                    and not args.subject.startswith(("//", ":"))):
                raise
            ws = None
        root = ws.root if ws else None
        return _COMMANDS[args.command](ws, args)
    except ForgeError as e:
        if getattr(args, "debug", False):
            import traceback
            traceback.print_exc()
        print(format_error(e, root), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("forge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # a bug in forge or a rule, never the user's mistake
        if is_disk_full(e):  # but a full disk is the machine's state, not a bug
            where = full_path(e, ws.cache_dir(getattr(args, "cache_dir", None)) if root else Path.cwd())
            print(format_error(disk_full(where), root), file=sys.stderr)
            return EXIT_BUILD_FAILED
        if getattr(args, "debug", False):
            raise
        print(f"forge: internal error: {type(e).__name__}: {e}\n"
              "This is a bug in forge or in a rule; rerun with --debug for the traceback "
              "and report it.", file=sys.stderr)
        return EXIT_INTERNAL


def _help(parser, topic) -> int:
    if topic is None:
        parser.print_help()
        print("\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:9} {text}")
        return EXIT_OK
    if topic not in COMMANDS:
        from forge.errors import did_you_mean
        print(format_error(UsageError(f"no command '{topic}'", hint=did_you_mean(topic, COMMANDS)
                                      or "forge help lists the commands")), file=sys.stderr)
        return EXIT_USAGE
    parser.parse_args([topic, "--help"])
    return EXIT_OK


# --- build, test, run ------------------------------------------------------------------

def _session(ws, args):
    from forge.session import Session
    return Session(ws, args.cache_dir)


def _build(ws, args, patterns, *, tests: bool = False, attest: bool = False):
    """Plan and run; with `attest`, write the provenance of the targets named (which
    `_sign` then signs when a key is set). Returns (session, plan, summary, exit code)."""
    started = time.time()
    from forge.events import ProgressReporter, summary_line, write_build_events, write_profile
    t0 = time.perf_counter()
    s = _session(ws, args)
    reporter = ProgressReporter(args.progress)
    from forge.workspace import weakened_checks
    for text in weakened_checks(ws.config):
        reporter.warning(text)
    from forge.signing import check_key_config
    # Loaded now so that a missing or wrong key fails before the build, not after it.
    args.loaded_sign_key = check_key_config(ws.root, ws.config, getattr(args, "sign_key", None))
    s.records.lock(lambda: print("forge: another forge is building this workspace; waiting",
                                 file=sys.stderr))
    try:
        from forge import uptodate
        check = None if args.nobuild else uptodate.begin(ws, s)
        if check is not None and check.plan is not None:
            plan = check.plan  # the watch saw nothing that could change it
        else:
            plan = s.plan(patterns, offline=args.offline, dry=args.nobuild)
        t1 = time.perf_counter()
        local = (plan.actions[i] for i in check.always) if check is not None and \
            check.plan is not None else plan.actions
        for text in dict.fromkeys(a.local for a in local if a.local):
            reporter.warning(text)  # from the plan, so a cached plan warns too
        if args.nobuild:
            print(f"forge: {len(plan.roots)} targets loaded and analysed, "
                  f"{len(plan.actions)} actions planned", file=sys.stderr)
            return s, plan, None, EXIT_OK
        if check is not None and check.noop is not None:
            summary, offset = check.noop, 0.0  # nothing changed since the last build
        else:
            from forge.remote.settings import executor_from_config, from_config
            remote = from_config(ws.config, url=args.remote_cache, upload=args.remote_upload,
                                 instance=args.remote_instance, timeout=args.remote_timeout)
            executor = executor_from_config(
                ws.config, url=args.remote_executor, local_fallback=args.remote_local_fallback,
                instance=args.remote_instance_name if args.remote_instance_name is not None
                else args.remote_instance, timeout=args.remote_timeout)
            scheduler = s.scheduler(jobs=ws.jobs(args.jobs), keep_going=args.keep_going,
                                    reporter=reporter, offline=args.offline, remote=remote,
                                    executor=executor)
            offset = scheduler.epoch - t0
            summary = scheduler.run(plan.actions, plan.static_keys or None,
                                    known=check.known if check is not None else None,
                                    graph=check.graph if check is not None else None)
        reporter.close()
        code = EXIT_INTERRUPTED if summary.interrupted else EXIT_OK if summary.ok else EXIT_BUILD_FAILED
        if check is not None:
            uptodate.remember(ws, s, plan, summary, code)
        _write_last(s, summary)
        print(summary_line(summary), file=sys.stderr)
        if attest and code == EXIT_OK and (check is None or check.noop is None):
            _provenance(ws, s, plan, summary, started)  # before _sign, which signs it
        if args.build_events:
            write_build_events(args.build_events, summary, code,
                               checked=None if check is None else check.why)
        if args.profile:
            for r in summary.results:
                r.start += offset
            write_profile(args.profile, summary, [("load+analyse", 0.0, t1 - t0),
                                                  ("execute", t1 - t0, time.perf_counter() - t1)])
        return s, plan, summary, code
    finally:
        reporter.close()
        s.records.save()
        s.records.unlock()


def _sign(ws, args, plan, summary, code) -> None:
    """After a successful build with a signing key: OUTPUT.dsse.json for each output of the
    targets named (and the Statements written for them before this call)."""
    key = getattr(args, "loaded_sign_key", None)
    if key is None or summary is None or code != EXIT_OK:
        return
    from forge.signing import sign_outputs
    outputs = [(str(label), a.path) for label in plan.roots if label in plan.infos
               for a in plan.infos[label].files]
    written = sign_outputs(ws.root, outputs, key)
    print(f"forge: signed {len(written)} outputs with key {key.keyid[:16]} "
          f"(OUTPUT.dsse.json beside each)", file=sys.stderr)


def _write_last(s, summary) -> None:
    from forge import uptodate
    if uptodate.write_last(s.ws, s.records, summary):
        return
    s.records.write_last([{"id": r.action.id, "label": str(r.action.owner),
                           "mnemonic": r.action.mnemonic, "description": r.action.description,
                           "status": r.status, "key": r.key, "reasons": r.reasons,
                           "ran_on": r.ran_on}
                          for r in summary.results], remote=summary.remote)


def _no_targets(what: str) -> int:
    # `forge build $(forge affected ...)` with nothing affected must not build everything.
    print(f"forge: no targets given, nothing to {what} (//... means every target)",
          file=sys.stderr)
    return EXIT_OK


def _provenance(ws, s, plan, summary, started: float) -> None:
    """Write NAME.provenance.json beside the outputs of each target built. A target none of
    whose actions ran in this build keeps the provenance it has: it still describes the
    build that made those bytes (and a no-op build of many targets stays cheap)."""
    from forge import provenance
    from forge.formats.common.files import atomic_write
    ran = {r.action.id for r in summary.results if r.status != "cached"}
    invocation, finished, build, memo = provenance.new_invocation_id(), time.time(), None, None
    for label in plan.roots:
        info = plan.infos.get(label)
        files = [a.path for a in (info.files if info else ()) if not a.source]
        if not files:
            continue
        dest = ws.root / provenance.path_for(label)
        if build is None:
            build = provenance.Build(ws.root, ws.config, plan.actions)
            memo = provenance.DigestMemo(s.records.dir / "output-sha256.json")
        needed = build.needed(files)
        if dest.is_file() and not any(a.id in ran for a in needed):
            continue
        st = build.statement(label, files, invocation_id=invocation, started=started,
                             finished=finished, needed=needed, memo=memo)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, provenance.dumps(st))
    if build is not None:
        memo.save()


def cmd_build(ws, args) -> int:
    if not args.patterns:
        return _no_targets("build")
    s, plan, summary, code = _build(ws, args, args.patterns, attest=True)
    _sign(ws, args, plan, summary, code)
    if code == EXIT_OK and args.load and summary is not None:
        if len(plan.roots) != 1:
            raise UsageError(f"--load needs exactly one target; {len(plan.roots)} matched")
        code = _call_runner(ws, plan, plan.roots[0], "load", [args.load])
    if summary is not None and code == EXIT_OK:
        shown = _shown(plan)
        if len(shown) <= MAX_PRINTED:
            for a in shown:
                print(os.path.relpath(ws.root / a.path))
        else:
            print(f"forge: {len(plan.roots)} targets built; their {len(shown)} outputs are under "
                  f"{os.path.relpath(ws.out_dir)}/", file=sys.stderr)
    s.close()
    return code


def cmd_provenance(ws, args) -> int:
    if args.target.endswith(("...", ":all", ":*")):
        raise UsageError(f"forge provenance takes one target, and {args.target} is a pattern",
                         hint="name one target, e.g. //images:redisos; `forge build` writes the "
                         "provenance of every target it is given")
    s, plan, summary, code = _build(ws, args, [args.target], attest=True)
    s.close()
    if code != EXIT_OK or summary is None:
        return code
    if len(plan.roots) != 1:
        raise UsageError(f"forge provenance takes one target; {args.target} matches "
                         f"{len(plan.roots)}", hint="name one target, e.g. //images:redisos")
    from forge.provenance import path_for
    written = ws.root / path_for(plan.roots[0])
    if not written.is_file():
        raise UsageError(f"{plan.roots[0]} has no output files: there is nothing to attest",
                         hint="name a target that builds files: a filegroup of sources has none")
    sys.stdout.write(written.read_text())
    return EXIT_OK


_SHOWN: list = [None, None]  # (plan, its outputs): a served no-op reuses the plan object


def _shown(plan) -> dict:
    if _SHOWN[0] is not plan:
        shown: dict = {}
        for label in plan.roots:
            info = plan.infos.get(label)
            if info is not None:
                shown.update(dict.fromkeys((*info.files, *((info.executable,) if info.executable else ()))))
        _SHOWN[:] = [plan, shown]
    return _SHOWN[1]


def cmd_test(ws, args) -> int:
    import threading

    from forge.testing import run_tests, write_junit
    if not args.patterns:
        if args.junit:  # CI steps that publish the report expect one, even an empty one
            write_junit(args.junit, [])
        return _no_targets("test")
    s, plan, summary, code = _build(ws, args, args.patterns)
    _sign(ws, args, plan, summary, code)
    if code != EXIT_OK or args.nobuild:
        return code
    if not plan.tests:
        print("forge: no test targets matched", file=sys.stderr)
        if args.junit:
            write_junit(args.junit, [])
        return EXIT_OK
    cancel = threading.Event()
    try:
        results = run_tests(plan, ws.root, s.cache, ws.jobs(args.jobs), cancel, ws.config)
    except KeyboardInterrupt:
        cancel.set()
        return EXIT_INTERRUPTED
    for r in results:
        status = "PASSED" if r.passed else "FAILED"
        print(f"{str(r.label):50} {status} in {r.duration:.2f}s" + (f" ({r.reason})" if r.reason else ""))
        if not r.passed and r.output.strip():
            print("\n".join("    " + ln for ln in r.output.rstrip().splitlines()[-30:]))
    failed = sum(not r.passed for r in results)
    print(f"forge: {len(results)} tests: {len(results) - failed} passed, {failed} failed",
          file=sys.stderr)
    if args.junit:
        write_junit(args.junit, results)
    return EXIT_TESTS_FAILED if failed else EXIT_OK


def _call_runner(ws, plan, label, what: str, argv: list[str]) -> int:
    from forge.contexts import RunContext
    from forge.ruleset import installed
    spec = plan.infos[label].extra.get(what)
    if spec is None:
        raise UsageError(f"{label} cannot be {'loaded' if what == 'load' else 'run'}",
                         hint="image targets (container_image, oci_pull, ...) can be loaded")
    fn = installed().load().runners.get(spec["runner"])
    if fn is None:
        raise UsageError(f"no runner '{spec['runner']}' is registered (is its rule family installed?)")
    return fn(RunContext(spec.get("params"), ws.root, argv, ws.config))


def cmd_load(ws, args) -> int:
    s, plan, summary, code = _build(ws, args, [args.target])
    _sign(ws, args, plan, summary, code)
    if code != EXIT_OK or summary is None:
        return code
    return _call_runner(ws, plan, plan.roots[0], "load", [args.tag] if args.tag else [])


def cmd_lock(ws, args) -> int:
    from forge.lockfile import LOCK_NAME
    s = _session(ws, args)
    if args.offline:
        raise UsageError("forge lock resolves references over the network; drop --offline")
    s.plan(args.patterns, refresh_lock=True, use_cache=False)
    print(f"forge: {LOCK_NAME} is up to date", file=sys.stderr)
    return EXIT_OK


def cmd_run(ws, args) -> int:
    s, plan, summary, code = _build(ws, args, [args.target])
    _sign(ws, args, plan, summary, code)
    if code != EXIT_OK:
        return code
    if len(plan.roots) != 1:
        raise UsageError(f"forge run needs exactly one target; {len(plan.roots)} matched")
    info = plan.infos[plan.roots[0]]
    if "run" in info.extra:
        return _call_runner(ws, plan, plan.roots[0], "run", args.program_args)
    if info.executable is None:
        raise UsageError(f"{plan.roots[0]} is not executable", hint="forge run takes a target with an "
                         "executable output (e.g. a genrule with executable = True)")
    argv = [str(ws.root / info.executable.path), *args.program_args]
    return os.spawnv(os.P_WAIT, argv[0], argv)


# --- query, graph, explain -------------------------------------------------------------

def _target_graph(ws, args, patterns):
    from forge.graphs import target_graph
    s = _session(ws, args)
    plan = s.plan(patterns, include_manual=True, use_cache=False)
    return s, plan, target_graph(plan)


def cmd_query(ws, args) -> int:
    from forge.graphfmt import format_dot, format_json, format_labels
    from forge.query import QueryError, evaluate
    s, plan, graph = _target_graph(ws, args, ["//..."])
    from forge.graphs import pattern_resolver
    try:
        result = evaluate(args.expr, graph, pattern_resolver(s, graph))
    except QueryError as e:
        raise UsageError(str(e)) from None
    fmt = {"label": format_labels, "json": format_json, "dot": format_dot}[args.output]
    sys.stdout.write(fmt(result, graph))
    return EXIT_OK


def cmd_graph(ws, args) -> int:
    from forge.graphfmt import format_dot, format_mermaid, render_svg
    from forge.query import QueryError
    s, plan, graph = _target_graph(ws, args, [args.target])
    import networkx as nx
    nodes = set()
    for r in plan.roots:
        nodes |= {str(r)} | nx.descendants(graph, str(r))
    if args.format == "mermaid":
        sys.stdout.write(format_mermaid(nodes, graph))
    elif args.format == "dot":
        sys.stdout.write(format_dot(nodes, graph))
    else:
        try:
            sys.stdout.buffer.write(render_svg(format_dot(nodes, graph)))
        except QueryError as e:
            raise UsageError(str(e)) from None
    return EXIT_OK


def cmd_affected(ws, args) -> int:
    import json

    from forge.affected import find_affected
    r = find_affected(ws, args.patterns, args.base, args.head)
    for w in r.warnings:
        print(f"WARNING: {w}", file=sys.stderr)  # as the build reports them
    if args.output == "json":
        print(json.dumps({"base": r.base, "head": r.head,
                          "changed": [{"path": p, "status": st} for p, st in r.changes.items()],
                          "targets": [{"label": str(lb), "kind": kind, "why": why}
                                      for lb, (kind, why) in r.targets.items()]}, indent=2))
    else:
        sys.stdout.write("".join(f"{lb}\n" for lb in r.targets))
    print(f"forge: {len(r.targets)} targets affected by {len(r.changes)} changed files "
          f"({r.base[:12]}..{r.head[:12] if r.head else 'working tree'})", file=sys.stderr)
    return EXIT_OK


def cmd_explain(ws, args) -> int:
    s = _session(ws, args)
    last = s.records.read_last()
    if last is None:
        raise UsageError("no build has run in this workspace yet", hint="run forge build first")
    wanted = None
    if args.patterns:
        plan = s.plan(args.patterns)
        wanted = {a.id for a in plan.actions}
    shown = 0
    for a in last["actions"]:
        if wanted is not None and a["id"] not in wanted:
            continue
        shown += 1
        if a["status"] == "executed":
            where = a.get("ran_on", "local")
            print(f"{a['description']}: ran" + (f" on {where}" if where.startswith("remote") else "")
                  + " because")
            for reason in a["reasons"] or ["(no reason recorded)"]:
                print(f"    {reason}")
        elif a["status"] == "cached" and a["reasons"]:
            print(f"{a['description']}: restored from the cache (an earlier build made key "
                  f"{a['key'][:16]}); since the last build:")
            for reason in a["reasons"]:
                print(f"    {reason}")
        elif a["status"] == "cached":
            print(f"{a['description']}: up to date (key {a['key'][:16]} unchanged)")
        elif a["status"] == "remote":
            print(f"{a['description']}: fetched from the remote cache (key {a['key'][:16]})")
            for reason in a["reasons"]:
                print(f"    {reason}")
        else:
            print(f"{a['description']}: {a['status']}")
    if not shown:
        print("forge: the last build ran no action of these targets", file=sys.stderr)
    return EXIT_OK


# --- keygen, verify ---------------------------------------------------------------------

def cmd_keygen(ws, args) -> int:
    from forge.formats.common.files import atomic_write
    from forge.formats.sign.keys import generate
    out = Path(args.out)
    pub = out.with_name(out.name + ".pub")
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists: forge keygen does not replace a key",
                         hint="choose another name, or pass --force to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: the directory {out.parent} does not exist")
    key = generate(args.type)
    atomic_write(out, key.pem, mode=0o600)
    atomic_write(pub, key.public.pem, mode=0o644)
    print(f"forge: wrote {out} (private, {args.type}, mode 0600) and {pub}; key id "
          f"{key.keyid}", file=sys.stderr)
    return EXIT_OK


def _registry_ref(arg: str) -> bool:
    """Whether `arg` names an image in a registry: its first component is a host (has a
    dot or a port, or is localhost), as Docker decides it. A missing file such as
    forge-out/x, or a Docker Hub short name, is not sent to a registry by accident."""
    first, slash, _ = arg.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost") \
        and not os.path.isdir(first)


def cmd_verify(ws, args) -> int:
    from forge.verifying import public_key, verify_image, verify_path
    key = public_key(args.key)
    arg = args.subject
    if os.path.lexists(arg):
        results = [verify_path(Path(arg), key, Path(args.signature) if args.signature else None)]
    elif arg.startswith("//") or arg.startswith(":"):
        if args.signature:
            raise UsageError("--signature goes with a FILE, not a target (whose outputs have "
                             "their own envelopes)")
        s = _session(ws, args)
        plan = s.plan([arg])
        results = []
        for label in plan.roots:
            files = plan.infos[label].files if label in plan.infos else []
            for a in files:
                results.append(verify_path(ws.root / a.path, key,
                                           shown=os.path.relpath(ws.root / a.path)))
        if not results:
            raise UsageError(f"{arg} has no outputs to verify")
    elif _registry_ref(arg):
        from forge.verifying import registry_client
        results = verify_image(registry_client(ws.config if ws else {}), arg, key)
    else:
        raise UsageError(f"{arg}: no such file, and not a target label or an image reference",
                         hint="forge verify takes a FILE, a //pkg:target or an image with its "
                         "registry, host/repo:tag (registry.example.com/team/app:v1)")
    for r in results:
        print(r)
    print(f"forge: {len(results)} verified", file=sys.stderr)
    return EXIT_OK


# --- clean, cache -----------------------------------------------------------------------

def cmd_clean(ws, args) -> int:
    from forge.leftovers import force_rmtree
    if ws.out_dir.exists():
        force_rmtree(ws.out_dir)
    if args.expunge:
        s = _session(ws, args)
        force_rmtree(s.records.dir)
        print(f"forge: removed {ws.out_dir} and this workspace's records", file=sys.stderr)
    else:
        print(f"forge: removed {ws.out_dir}", file=sys.stderr)
    return EXIT_OK


def cmd_cache(ws, args) -> int:
    from forge.cache import parse_size
    s = _session(ws, args)
    if args.cache_command == "stats":
        st = s.cache.stats()
        print(f"cache: {st['dir']}\nblobs: {st['blobs']} ({human_size(st['bytes'])})\n"
              f"action records: {st['records']}")
        last = s.records.read_last()
        if last:
            _print_last_rates(last)
        return EXIT_OK
    try:
        limit = parse_size(args.max_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    r = s.cache.gc(limit)
    print(f"forge: removed {r['blobs_removed']} blobs ({human_size(r['bytes_freed'])}), dropped "
          f"{r['records_dropped']} records; {human_size(r['bytes_kept'])} kept")
    return EXIT_OK


def _print_last_rates(last: dict) -> None:
    acts = last["actions"]
    n = len(acts)
    local = sum(a["status"] == "cached" for a in acts)
    remote = sum(a["status"] == "remote" for a in acts)
    ran = sum(a["status"] == "executed" for a in acts)

    def pct(k, total):
        return f"{100 * k / total:.0f}%" if total else "n/a"
    print(f"last build: {n} actions, {local} cached locally (local hit rate {pct(local, n)})")
    r = last.get("remote")
    if r is None:
        print("remote cache: none used")
        return
    asked = remote + ran
    print(f"remote cache: {r['url']} ({'read-write' if r.get('upload') else 'read-only'})\n"
          f"  {remote} of the {asked} local misses fetched (remote hit rate {pct(remote, asked)}), "
          f"{ran} executed\n"
          f"  downloaded {r.get('blobs_down', 0)} blobs ({human_size(r.get('bytes_down', 0))}), "
          f"uploaded {r.get('blobs_up', 0)} blobs ({human_size(r.get('bytes_up', 0))}) for "
          f"{r.get('uploads', 0)} results"
          + (f"\n  {r['errors']} remote errors" if r.get("errors") else "")
          + ("; the remote was given up during the build" if r.get("down") else ""))


def cmd_worker(args) -> int:
    from forge.remote.settings import from_config
    if args.concurrency < 1:
        raise UsageError(f"--concurrency {args.concurrency}: a worker runs at least one lease")
    remote = from_config({}, url=args.executor, instance=args.instance, upload=True)
    if remote is None or not remote.grpc:
        raise UsageError(f"--executor {args.executor!r}: the Bots API needs grpc:// or grpcs://")
    platform: dict[str, list[str]] = {}
    for item in args.platform:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--platform {item!r}: expected KEY=VALUE (e.g. docker=1)")
        platform.setdefault(key, []).append(value)
    from forge.remote.worker import Worker, WorkerConfig
    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    w = Worker(WorkerConfig(remote, work_dir, args.concurrency, platform, args.name,
                            args.max_timeout), log=lambda text: print(text, file=sys.stderr,
                                                                      flush=True))
    signal.signal(signal.SIGTERM, lambda *_: w.drain())
    signal.signal(signal.SIGINT, lambda *_: w.stop())
    return w.run()


_COMMANDS = {"build": cmd_build, "test": cmd_test, "run": cmd_run, "load": cmd_load,
             "lock": cmd_lock, "query": cmd_query, "affected": cmd_affected,
             "graph": cmd_graph, "explain": cmd_explain, "clean": cmd_clean, "cache": cmd_cache,
             "verify": cmd_verify, "keygen": cmd_keygen, "provenance": cmd_provenance}
