#!/usr/bin/env bash
# Set up (dev/setup.sh), then build the example workspaces: examples/basic (core rules,
# its tests) and examples/containers (a Debian base from the mirror and a three-stage
# Dockerfile), and run the container image it builds.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
cd "$forge_root/examples/basic"
forge build //...
forge test //...
cd "$forge_root/examples/containers"
forge build //...
forge run //hello
