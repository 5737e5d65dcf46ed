"""Dockerfile parser, variable scoping, stage graph and .dockerignore (forge.formats)."""

from __future__ import annotations

import textwrap

import pytest

from forge.formats.dockerfile.errors import DockerfileError
from forge.formats.dockerfile.lexer import mount_options, substitute
from forge.formats.dockerfile.parser import (context_sources, external_refs, needed_stages, parse, remote_sources,
                                      stage_deps)
from forge.formats.dockerfile.ignore import DockerIgnore


def df(text: str):
    return parse(textwrap.dedent(text).lstrip("\n"))


def only(text: str):
    """The instructions of the single stage of `text`."""
    return df(text).stages[0].instructions


def error(text: str) -> str:
    with pytest.raises(DockerfileError) as e:
        parse(textwrap.dedent(text).lstrip("\n"))
    return str(e.value)


# --- lines, comments, directives ------------------------------------------------------

def test_continuation_lines_with_comments_and_empty_lines_between():
    (run,) = only("""
        FROM alpine
        RUN apk add \\
          # the compiler
          gcc \\

            make
    """)
    assert run.args == ["apk add   gcc     make"]
    assert (run.line, run.end_line) == (2, 6)
    assert run.original.splitlines()[1] == "  # the compiler"


def test_trailing_blanks_after_escape_still_continue():
    (run,) = only("FROM a\nRUN a \\  \n b\n")
    assert run.args == ["a  b"]


def test_comments_and_case_insensitive_names():
    ins = only("""
        # a comment
        from alpine
          # indented comment
        run echo hi
        Copy a b
    """)
    assert [i.cmd for i in ins] == ["RUN", "COPY"]


def test_escape_directive_with_backtick():
    d = df("""
        # escape=`
        FROM mcr.microsoft.com/windows
        RUN dir c:\\ `
            && echo done
        ENV P=C:\\tools
    """)
    assert d.directives == {"escape": "`"}
    run, env = d.stages[0].instructions
    assert run.args == ["dir c:\\     && echo done"]
    assert d.resolve().stages[0].env == {"P": "C:\\tools"}


def test_directives_only_at_the_top():
    d = df("""
        # syntax=docker/dockerfile:1
        # check=skip=all
        # escape=`
        FROM a
    """)
    assert d.directives == {"syntax": "docker/dockerfile:1", "check": "skip=all", "escape": "`"}
    # after an ordinary comment, a directive is just a comment
    assert df("# hello\n# escape=`\nFROM a\n").escape == "\\"
    assert error("# escape=\\\n# escape=`\nFROM a\n") == \
        "Dockerfile:2:1: only one escape parser directive can be used"
    assert error("# escape=x\nFROM a\n") == "Dockerfile:1:1: invalid escape token 'x': must be \\ or `"


# --- heredocs -------------------------------------------------------------------------

def test_single_heredoc():
    (run, after) = only("""
        FROM a
        RUN <<EOF
        set -e
          echo "$HOME"
        EOF
        USER me
    """)
    assert run.args == ["<<EOF"]
    assert run.heredocs[0].name == "EOF" and run.heredocs[0].expand
    assert run.heredocs[0].content == 'set -e\n  echo "$HOME"\n'
    assert (run.line, run.end_line) == (2, 5) and after.line == 6


def test_several_heredocs_on_one_line_and_dash_strips_tabs():
    (copy,) = only("FROM a\nCOPY <<one <<-two /dst/\n1\n\tone\none\n\t\t2\n\ttwo\n")
    one, two = copy.heredocs
    assert (one.name, one.content) == ("one", "1\n\tone\n")
    assert (two.name, two.content, two.chomp) == ("two", "2\n", True)
    assert copy.args == ["<<one", "<<-two", "/dst/"]


def test_quoted_heredoc_disables_expansion_and_copy_expands_unquoted():
    d = df("""
        FROM a
        ARG NAME=world
        COPY <<"RAW" <<HOT /x/
        $NAME
        RAW
        hello $NAME \\$NAME
        HOT
        RUN python3 <<'PY' > out
        print("$NAME")
        PY
    """)
    copy = d.resolve().stages[0].instructions[1]
    raw, hot = copy.heredocs
    assert not raw.expand and raw.content == "$NAME\n"
    assert hot.expand and hot.content == "hello world $NAME\n"
    run = d.stages[0].instructions[2]
    assert run.args == ["python3 <<'PY' > out"] and run.heredocs[0].content == 'print("$NAME")\n'
    assert d.resolve().stages[0].instructions[2].heredocs[0].content == 'print("$NAME")\n'


def test_heredoc_only_for_run_copy_add():
    (cmd,) = only("FROM a\nCMD cat <<EOF\n")
    assert cmd.heredocs == [] and cmd.args == ["cat <<EOF"]


def test_unterminated_heredoc():
    assert error("FROM a\nRUN <<EOF\necho hi\n") == \
        "Dockerfile:2:5: unterminated heredoc 'EOF': no line 'EOF' before the end of the file"


# --- forms and flags ------------------------------------------------------------------

def test_json_vs_shell_form():
    cmd, ep, run, bad, shell = only("""
        FROM a
        CMD ["nginx", "-g", "daemon off;"]
        ENTRYPOINT /bin/entry --flag
        RUN [ "echo", "a b" ]
        CMD [not json]
        SHELL ["/bin/bash", "-c"]
    """)
    assert (cmd.json_form, cmd.args) == (True, ["nginx", "-g", "daemon off;"])
    assert (ep.json_form, ep.args) == (False, ["/bin/entry --flag"])
    assert (run.json_form, run.args) == (True, ["echo", "a b"])
    assert (bad.json_form, bad.args) == (False, ["[not json]"])
    assert shell.args == ["/bin/bash", "-c"]


def test_copy_json_form_keeps_spaces():
    (copy,) = only('FROM a\nCOPY ["my file.txt", "other one", "/dst dir/"]\n')
    assert copy.json_form and copy.args == ["my file.txt", "other one", "/dst dir/"]


def test_copy_and_run_flags():
    copy, add, run = only("""
        FROM a
        COPY --chown=app:app --chmod=0755 --link --exclude=*.tmp --exclude=.git src/ /app/
        ADD --checksum=sha256:abc --keep-git-dir=false https://x/y.tgz /y
        RUN --mount=type=cache,target=/root/.cache --mount=type=secret,id=tok --network=none make
    """)
    assert copy.flags == {"chown": "app:app", "chmod": "0755", "link": "true",
                          "exclude": ["*.tmp", ".git"]}
    assert copy.args == ["src/", "/app/"]
    assert add.flags == {"checksum": "sha256:abc", "keep-git-dir": "false"}
    assert run.flags["mount"] == ["type=cache,target=/root/.cache", "type=secret,id=tok"]
    assert run.flags["network"] == "none" and run.args == ["make"]
    assert mount_options("type=cache,target=/c,from=build,ro") == \
        {"type": "cache", "target": "/c", "from": "build", "ro": "true"}


def test_healthcheck():
    none, hc = only("""
        FROM a
        HEALTHCHECK NONE
        HEALTHCHECK --interval=30s --retries=3 CMD ["curl", "-f", "http://localhost/"]
    """)
    assert none.args == ["NONE"]
    assert hc.flags == {"interval": "30s", "retries": "3"}
    assert hc.json_form and hc.args == ["CMD", "curl", "-f", "http://localhost/"]
    assert error("FROM a\nHEALTHCHECK --interval=soon CMD true\n") == \
        "Dockerfile:2:13: --interval must be a duration such as 30s or 1m30s, got 'soon'"


def test_simple_instructions():
    ins = only("""
        FROM a
        MAINTAINER Jane <j@example.com>
        EXPOSE 80/tcp 443
        VOLUME ["/data", "/logs"]
        VOLUME /a /b
        WORKDIR /srv/my app
        USER 1000:1000
        STOPSIGNAL SIGTERM
        ONBUILD COPY . /src
        LABEL a=1 "b c"="d e"
        LABEL legacy value here
    """)
    assert [i.args for i in ins] == [
        ["Jane <j@example.com>"], ["80/tcp", "443"], ["/data", "/logs"], ["/a", "/b"],
        ["/srv/my app"], ["1000:1000"], ["SIGTERM"], ["COPY . /src"],
        ["a=1", '"b c"="d e"'], ["legacy=value here"]]


# --- ARG / ENV / substitution ---------------------------------------------------------

def test_env_both_forms():
    d = df("""
        FROM a
        ENV a=b c="d e" f=d\\ e
        ENV key value with  spaces
        ENV g=$a h=${c}
    """)
    assert d.stages[0].instructions[1].pairs() == [("key", "value with  spaces")]
    assert d.resolve().stages[0].env == {"a": "b", "c": "d e", "f": "d e",
                                         "key": "value with  spaces", "g": "b", "h": "d e"}


def test_env_substitution_sees_values_from_before_the_instruction():
    d = df("FROM a\nENV abc=hello\nENV abc=bye def=$abc\n")
    assert d.resolve().stages[0].env == {"abc": "bye", "def": "hello"}


def test_no_substitution_in_single_quotes():
    d = df("FROM a\nENV x=1\nLABEL one='$x' two=\"$x\" three=\\$x\n")
    assert d.resolve().stages[0].instructions[1].args == ["one=$x", "two=1", "three=$x"]


@pytest.mark.parametrize("word,expected", [
    ("$x", "1"), ("${x}", "1"), ("$unset", ""), ("a${x}b", "a1b"),
    ("${unset:-dflt}", "dflt"), ("${empty:-dflt}", "dflt"), ("${empty-dflt}", ""),
    ("${unset-dflt}", "dflt"), ("${x:+alt}", "alt"), ("${empty:+alt}", ""),
    ("${empty+alt}", "alt"), ("${unset+alt}", ""), ("${unset:-$x}", "1"),
    ("\\$x", "$x"), ("'$x'", "$x"), ('"$x"', "1"), ('"a\\"b"', 'a"b'), ("$", "$"),
    ("$1", ""), ("100%", "100%"),
])
def test_substitute(word, expected):
    assert substitute(word, {"x": "1", "empty": ""}) == expected


def test_substitute_errors():
    for word, message in [("${x", "syntax error: missing '}'"),
                          ("${}", "syntax error: bad substitution"),
                          ("${x:3}", "unsupported modifier (:3) in substitution"),
                          ("${x:?need x}", "x: need x"), ("'open", "unexpected end of statement "
                                                          "while looking for matching single-quote")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            substitute(word, {})


def test_global_arg_used_in_from_and_invisible_in_stage_unless_redeclared():
    d = df("""
        ARG VERSION=3.19
        FROM alpine:${VERSION} AS one
        LABEL v=$VERSION
        FROM alpine:${VERSION} AS two
        ARG VERSION
        LABEL v=$VERSION
    """)
    r = d.resolve()
    assert d.global_args == [("VERSION", "3.19")]
    assert r.stages[0].base.ref == "alpine:3.19" and r.stages[1].base.ref == "alpine:3.19"
    assert r.stages[0].instructions[0].args == ["v="]
    assert r.stages[1].instructions[1].args == ["v=3.19"]
    assert r.stages[0].used_args == {"VERSION": "3.19"}  # through FROM only


def test_build_arg_overrides_defaults_and_unused_are_reported():
    d = df("""
        ARG VERSION=3.19
        FROM alpine:$VERSION
        ARG MODE=debug
        ARG UNREAD=1
        WORKDIR /build/$MODE
    """)
    r = d.resolve({"VERSION": "3.20", "MODE": "release", "STRAY": "x"})
    assert r.stages[0].base.ref == "alpine:3.20"
    assert r.stages[0].instructions[-1].args == ["/build/release"]
    assert r.stages[0].used_args == {"VERSION": "3.20", "MODE": "release"}
    assert r.unused_build_args == {"STRAY"}
    assert d.resolve().stages[0].instructions[-1].args == ["/build/debug"]


def test_args_visible_to_run_are_used_and_env_beats_arg():
    d = df("""
        FROM a
        ARG X=1
        ARG Y
        ENV X=env
        WORKDIR /$X
        RUN make
    """)
    s = d.resolve({"Y": "2"}).stages[0]
    assert s.instructions[3].args == ["/env"]
    assert s.used_args == {"Y": "2"}
    assert s.steps[-1].env == {"X": "env", "Y": "2"}


def test_stage_inherits_env_of_its_base_stage_but_not_args():
    r = df("FROM a AS base\nARG A=1\nENV E=2\nFROM base\nLABEL x=$A$E\n").resolve()
    assert r.stages[1].base.kind == "stage" and r.stages[1].base.stage == 0
    assert r.stages[1].instructions[0].args == ["x=2"]


def test_run_and_cmd_are_not_substituted():
    r = df("FROM a\nARG X=1\nRUN echo $X\nCMD echo $X\nEXPOSE ${X}0\n").resolve()
    assert [i.args for i in r.stages[0].instructions[1:]] == [["echo $X"], ["echo $X"], ["10"]]


def test_several_args_per_line_and_quoted_default():
    (arg,) = only('FROM a\nARG A B=2 C="x y"\n')
    assert arg.pairs() == [("A", None), ("B", "2"), ("C", '"x y"')]
    assert df('FROM a\nARG A B=2 C="x y"\n').resolve().stages[0].instructions[0].args == \
        ["A", "B=2", "C=x y"]


# --- stages ---------------------------------------------------------------------------

MULTI = """
    FROM golang:1.22 AS build
    COPY . /src
    RUN go build -o /out/app ./cmd/app
    FROM alpine AS docs
    RUN echo unrelated
    FROM debian AS tools
    RUN make tools
    FROM scratch AS final
    COPY --from=build /out/app /app
    COPY --from=2 /usr/bin/tool /tool
    COPY --from=busybox:1.36 /bin/sh /bin/sh
"""


def test_multi_stage_names_and_refs():
    d = df(MULTI)
    assert [(s.index, s.name, s.base) for s in d.stages] == [
        (0, "build", "golang:1.22"), (1, "docs", "alpine"), (2, "tools", "debian"),
        (3, "final", "scratch")]
    final = d.resolve().stages[3]
    assert final.base.kind == "scratch"
    assert stage_deps(final) == {0, 2} == stage_deps(d.stages[3])
    assert external_refs(final) == {"busybox:1.36"}


def test_needed_stages_skips_unrelated_and_orders_dependencies():
    d = df(MULTI)
    assert needed_stages(d) == [0, 2, 3]
    assert needed_stages(d, "docs") == [1]
    chain = df("FROM a AS x\nFROM x AS y\nFROM b AS z\nRUN --mount=from=y,target=/y true\n")
    assert needed_stages(chain, "z") == [0, 1, 2]


def test_from_via_build_arg_changes_the_graph():
    d = df("ARG SRC=build\nFROM a AS build\nFROM b AS other\nFROM c\nARG SRC\nCOPY --from=$SRC / /\n")
    assert needed_stages(d) == [0, 2]
    assert needed_stages(d, build_args={"SRC": "other"}) == [1, 2]


def test_unknown_target():
    with pytest.raises(DockerfileError) as e:
        needed_stages(df(MULTI), "buidl")
    assert str(e.value) == ("Dockerfile: target stage 'buidl' not found; stages are: build, "
                            "docs, tools, final; did you mean 'build'?")


def test_from_stage_name_is_case_insensitive_and_platform_kept():
    d = df("ARG P=linux/arm64\nFROM --platform=$P alpine AS Base\nFROM BASE\n")
    r = d.resolve()
    assert d.stages[0].name == "base" and r.stages[0].platform == "linux/arm64"
    assert r.stages[1].base.stage == 0


def test_context_sources():
    d = df("""
        FROM a AS b
        COPY go.mod go.sum ./
        COPY --from=busybox /x /y
        COPY <<EOF cfg/*.yaml /etc/
        data
        EOF
        ADD --checksum=sha256:00 https://example.com/f.tgz vendor.tgz /opt/
        ARG DIR=src
        COPY ${DIR}/ /src/
    """)
    r = d.resolve({"DIR": "lib"}).stages[0]
    assert [srcs for _, srcs in context_sources(r)] == [
        ["go.mod", "go.sum"], ["cfg/*.yaml"], ["vendor.tgz"], ["lib/"]]
    assert [(u, c) for _, u, c in remote_sources(r)] == [("https://example.com/f.tgz", "sha256:00")]
    with pytest.raises(DockerfileError, match="not hermetic"):
        context_sources(df("FROM a\nADD https://x.org/a.tgz /a\n").stages[0])


# --- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("FROM a\nRUNN make\n", "Dockerfile:2:1: unknown instruction 'RUNN'; did you mean 'RUN'?"),
    ("FROM a\n  cpoy a b\n", "Dockerfile:2:3: unknown instruction 'cpoy'; did you mean 'COPY'?"),
    ("FROM a\nFROBNICATE\n", "Dockerfile:2:1: unknown instruction 'FROBNICATE'"),
    ("ARG X\nFROM\n", "Dockerfile:2:1: FROM needs an image"),
    ("FROM a b\n", "Dockerfile:1:6: FROM takes 'image [AS name]', got 'a b'"),
    ("FROM a AS Bad!\n", "Dockerfile:1:1: invalid stage name 'Bad!': use a letter, then letters, "
                         "digits, '-', '_' or '.'"),
    ("FROM a AS x\nFROM b AS x\n", "Dockerfile:2:1: duplicate stage name 'x' (first used on line 1)"),
    ("RUN make\nFROM a\n", "Dockerfile:1:1: RUN before the first FROM; only ARG may come before FROM"),
    ("# just a comment\n", "Dockerfile:1:1: no FROM instruction: a Dockerfile needs at least one stage"),
    ("FROM a\nCOPY onlyone\n", "Dockerfile:2:1: COPY requires at least two arguments, but only one "
                               "was provided. Destination could not be determined."),
    ("FROM a\nCOPY --fro=x a b\n", "Dockerfile:2:6: unknown flag --fro for COPY; did you mean --from?"),
    ("FROM a\nWORKDIR --x=1 /a\n", "Dockerfile:2:9: unknown flag --x for WORKDIR; WORKDIR takes no flags"),
    ("FROM a\nCOPY --from a b\n", "Dockerfile:2:6: --from needs a value: --from=<value>"),
    ("FROM a\nRUN --network=wifi x\n",
     "Dockerfile:2:5: --network must be one of default, none, host; got 'wifi'"),
    ("FROM a\nENV a=1 b\n", "Dockerfile:2:9: ENV syntax error: can't find '=' in 'b'; mixing "
                            "'name=value' and 'name value' forms is not allowed"),
    ("FROM a\nENV lonely\n", "Dockerfile:2:5: ENV needs a value: 'ENV lonely=<value>' (or the "
                             "legacy 'ENV lonely <value>')"),
    ("FROM a\nARG =1\n", "Dockerfile:2:5: ARG names can not be blank"),
    ("FROM a\nRUN \\\n  \\\n", "Dockerfile:2:1: RUN requires at least one argument"),
    ("FROM a\nSHELL /bin/sh -c\n",
     'Dockerfile:2:7: SHELL requires the arguments in JSON form, e.g. SHELL ["/bin/sh", "-c"]'),
    ("FROM a\nCMD [1, 2]\n",
     "Dockerfile:2:5: when using JSON array syntax, arrays must be comprised of strings only"),
    ("FROM a AS x\nCOPY --from=x /a /b\n",
     "Dockerfile:2:1: --from=x refers to this stage (0); a stage can only use stages defined before it"),
    ("FROM a\nCOPY --from=1 /a /b\nFROM b\n",
     "Dockerfile:2:1: --from=1 refers to a later stage (1); a stage can only use stages defined "
     "before it"),
    ("FROM a\nONBUILD FROM b\n", "Dockerfile:2:9: FROM isn't allowed as an ONBUILD trigger"),
    ("FROM a\nRUN echo \\\n  --bad\nUSER \\\n  --x=1 me\n",
     "Dockerfile:5:3: unknown flag --x for USER; USER takes no flags"),
])
def test_error_messages(text, message):
    assert error(text) == message


def test_resolve_errors_carry_the_instruction_position():
    d = df("FROM a\nARG X\nWORKDIR ${X:?must be set}\n")
    with pytest.raises(DockerfileError) as e:
        d.resolve()
    assert str(e.value) == "Dockerfile:3:1: X: must be set"
    assert d.resolve({"X": "/w"}).stages[0].instructions[1].args == ["/w"]
    with pytest.raises(DockerfileError, match="later stage"):
        df("ARG S=late\nFROM a\nARG S\nCOPY --from=$S / /\nFROM b AS late\n").resolve()
    # a global ARG is not seen in a stage unless redeclared: --from expands to nothing
    with pytest.raises(DockerfileError, match=r"3:1: --from=\$S expands to nothing"):
        df("ARG S=x\nFROM a\nCOPY --from=$S / /\n").resolve()


def test_filename_in_errors():
    with pytest.raises(DockerfileError) as e:
        parse("FROM a\nRUNN x\n", filename="images/redis/Dockerfile")
    assert str(e.value).startswith("images/redis/Dockerfile:2:1: ")
    assert (e.value.line, e.value.col) == (2, 1)


# --- .dockerignore --------------------------------------------------------------------

def test_dockerignore_exceptions_last_match_wins():
    ig = DockerIgnore("# docs\n*.md\n!README.md\n")
    assert ig.matches("CHANGES.md") and not ig.matches("README.md")
    assert not ig.matches("docs/guide.md")  # `*` does not cross `/`
    assert ig.filter(["a.md", "README.md", "main.go"]) == ["README.md", "main.go"]
    assert DockerIgnore("!README.md\n*.md\n").matches("README.md")


def test_dockerignore_double_star_and_directories():
    ig = DockerIgnore("**/tmp\nbuild/\n**/*.pyc\n")
    assert ig.matches("tmp") and ig.matches("a/b/tmp") and ig.matches("a/tmp/file")
    assert ig.matches("build") and ig.matches("build/out/x.o")
    assert ig.matches("x.pyc") and ig.matches("pkg/sub/x.pyc")
    assert not ig.matches("tmpfile") and not ig.matches("src/build.go")


def test_dockerignore_leading_slash_and_cleaning():
    ig = DockerIgnore("/abs\n  ./spaced//dir/../file  \n   # not a comment\n")
    assert ig.patterns == [(False, "abs"), (False, "spaced/file"), (False, "# not a comment")]
    assert ig.matches("abs") and ig.matches("abs/x") and ig.matches("/abs/y")
    assert ig.matches("spaced/file") and not ig.matches("x/abs")


def test_dockerignore_exception_inside_ignored_directory():
    ig = DockerIgnore("vendor\n!vendor/keep\n")
    assert ig.matches("vendor/drop.c")
    assert not ig.matches("vendor/keep") and not ig.matches("vendor/keep/a.c")


def test_dockerignore_classes_and_question_mark():
    ig = DockerIgnore("file?.txt\n[a-c].log\nlit\\*\n")
    assert ig.matches("file1.txt") and not ig.matches("file10.txt")
    assert ig.matches("b.log") and not ig.matches("d.log")
    assert ig.matches("lit*") and not ig.matches("litx")
    # A user error (a FormatError), naming the file and line, like a Dockerfile's.
    with pytest.raises(DockerfileError, match=r"^\.dockerignore:2:1: .*unterminated"):
        DockerIgnore("ok\nbad[\n")
    with pytest.raises(DockerfileError, match=r"^\.dockerignore:1:1: bad pattern '\[z-a\]'"):
        DockerIgnore("[z-a]\n")  # found by tests/fuzz: re.error escaped before
