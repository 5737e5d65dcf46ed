#!/usr/bin/env bash
# Set up (dev/setup.sh), then build the example workspace and run its tests.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
cd "$forge_root/examples/basic"
forge build //...
forge test //...
