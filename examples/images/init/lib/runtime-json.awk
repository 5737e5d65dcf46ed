# Reads a bundle's runtime.json (LinuxKit's runtime extras: what runc does not do) and
# prints what the init must do before running the bundle, one action a line, fields
# separated by \037 (a tab would merge empty fields when the shell splits them):
#
#   mount <type> <source> <destination> <options,comma,separated>
#   mkdir <path>
#   cgroup <path below /sys/fs/cgroup>
#   iface <name> <add> <peer> <createInRoot>   an interface for the container's netns
#   bindns <kind> <path>   bind the container's <kind> namespace (net, ipc...) at <path>
#   namespace <name>  the containerd namespace LinuxKit would run a service in
#
# Relative paths are left relative: the caller resolves them against the bundle's rootfs.
# A small JSON reader is needed because the image has busybox and nothing else.

{ text = text $0 "\n" }

END {
    pos = 1
    n = length(text)
    value("")
    ws()
    if (pos <= n) fail("unexpected text after the JSON value")

    S = "\037"
    for (i = 0; i < count("mounts"); i++) {
        m = "mounts." i
        opts = ""
        for (j = 0; j < count(m ".options"); j++)
            opts = opts (j ? "," : "") V[m ".options." j]
        print "mount" S V[m ".type"] S V[m ".source"] S V[m ".destination"] S opts
    }
    for (i = 0; i < count("mkdir"); i++) print "mkdir" S V["mkdir." i]
    for (i = 0; i < count("cgroups"); i++) print "cgroup" S V["cgroups." i]
    for (i = 0; i < count("interfaces"); i++) {
        f = "interfaces." i
        print "iface" S V[f ".name"] S V[f ".add"] S V[f ".peer"] S (V[f ".createInRoot"] == "true")
    }
    split("cgroup ipc mnt net pid user uts", kinds, " ")
    for (k = 1; k in kinds; k++)
        if (V["bindNS." kinds[k]] != "") print "bindns" S kinds[k] S V["bindNS." kinds[k]]
    if (V["namespace"] != "") print "namespace" S V["namespace"]
}

function count(path) { return (path "#") in V ? V[path "#"] : 0 }

function fail(msg) {
    print "runtime.json: " msg " (at character " pos ")" > "/dev/stderr"
    exit 1
}

function ws() {
    while (pos <= n && index(" \t\r\n", substr(text, pos, 1))) pos++
}

function expect(c) {
    ws()
    if (substr(text, pos, 1) != c) fail("expected '" c "'")
    pos++
}

# Stores scalars as V[path] (path: keys and list indexes joined by dots) and list
# lengths as V[path "#"].
function value(path,    c, key, i) {
    ws()
    c = substr(text, pos, 1)
    if (c == "{") {
        pos++
        ws()
        if (substr(text, pos, 1) == "}") { pos++; return }
        for (;;) {
            ws()
            if (substr(text, pos, 1) != "\"") fail("expected a key")
            key = str()
            expect(":")
            value(path == "" ? key : path "." key)
            ws()
            c = substr(text, pos++, 1)
            if (c == "}") return
            if (c != ",") fail("expected ',' or '}'")
        }
    }
    if (c == "[") {
        pos++
        i = 0
        ws()
        if (substr(text, pos, 1) == "]") { pos++; V[path "#"] = 0; return }
        for (;;) {
            value(path "." i++)
            ws()
            c = substr(text, pos++, 1)
            if (c == "]") { V[path "#"] = i; return }
            if (c != ",") fail("expected ',' or ']'")
        }
    }
    if (c == "\"") { V[path] = str(); return }
    if (match(substr(text, pos), /^(true|false|null|-?[0-9][0-9.eE+-]*)/)) {
        V[path] = substr(text, pos, RLENGTH)
        pos += RLENGTH
        return
    }
    fail("expected a value")
}

function str(    out, c) {
    pos++
    out = ""
    for (;;) {
        if (pos > n) fail("unterminated string")
        c = substr(text, pos++, 1)
        if (c == "\"") return out
        if (c == "\\") {
            c = substr(text, pos++, 1)
            if (c == "n") c = "\n"
            else if (c == "t") c = "\t"
            else if (c == "r") c = "\r"
            else if (c == "b") c = "\b"
            else if (c == "f") c = "\f"
            else if (c == "u") { c = "?"; pos += 4 }  # paths and options are ASCII
        }
        out = out c
    }
}
