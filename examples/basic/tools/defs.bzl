"""Macros shared by BUILD files: load("//tools:defs.bzl", "banner")."""

def banner(name, text, **kwargs):
    """A genrule writing `text` between two rules of '=' into <name>.txt.

    A macro is a plain Starlark function: it runs while the BUILD file is
    loaded and declares ordinary targets through native.<rule>.
    """
    line = "=" * len(text)
    native.genrule(
        name = name,
        outs = [name + ".txt"],
        cmd = "printf '%s\\n' '{}' '{}' '{}' > $@".format(line, text, line),
        **kwargs
    )
