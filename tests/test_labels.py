from __future__ import annotations

import pytest

from forge.labels import Label, LabelError, Pattern, parse_label, parse_pattern


@pytest.mark.parametrize("text,pkg,expected", [
    ("//a/b:c", None, Label("a/b", "c")),
    ("//a/b", None, Label("a/b", "b")),
    ("//:root", None, Label("", "root")),
    (":x", "p", Label("p", "x")),
    ("x.txt", "p", Label("p", "x.txt")),
    ("sub/x.txt", "p", Label("p", "sub/x.txt")),
    ("//p:dir/file.txt", None, Label("p", "dir/file.txt")),
])
def test_parse_label(text, pkg, expected):
    assert parse_label(text, pkg) == expected


@pytest.mark.parametrize("text", ["", "//", "//a//b:c", "//a:", "//a:b:c", "@repo//a:b",
                                  "//a/../b:c", "relative", "//a:../x"])
def test_bad_labels_say_what_a_label_looks_like(text):
    with pytest.raises(LabelError) as e:
        parse_label(text)
    assert "label looks like" in e.value.hint


@pytest.mark.parametrize("text,cwd,expected", [
    ("//...", "", Pattern("", None, True)),
    ("//a/...", "", Pattern("a", None, True)),
    ("...", "a", Pattern("a", None, True)),
    ("//a:all", "", Pattern("a", None)),
    ("//a:*", "", Pattern("a", None)),
    ("//a", "", Pattern("a", "a")),
    (":x", "a/b", Pattern("a/b", "x")),
    ("b:x", "a", Pattern("a/b", "x")),
])
def test_parse_pattern(text, cwd, expected):
    assert parse_pattern(text, cwd) == expected


def test_label_str_and_short():
    assert str(Label("a/b", "b")) == "//a/b:b"
    assert Label("a/b", "b").short == "//a/b"
    assert Label("a", "x").short == "//a:x"
