#!/usr/bin/env bash
# Set up (dev/setup.sh), then build the example workspaces: examples/basic (core rules,
# its tests), examples/containers (a Debian base from the mirror and a three-stage
# Dockerfile, run in the engine), and RedisOS in examples/ (booted under QEMU until Redis
# answers PING through a forwarded port).
set -euo pipefail
source "$(dirname "$0")/setup.sh"
cd "$forge_root/examples/basic"
forge build //...
forge test //...
cd "$forge_root/examples/containers"
forge build //...
forge run //hello
cd "$forge_root/examples"
forge build //images:redisos
forge test //images:boot_test
