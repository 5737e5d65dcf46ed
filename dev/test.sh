#!/usr/bin/env bash
# Set up (dev/setup.sh), then run forge's test suite. Extra arguments go to pytest,
# e.g. `bash dev/test.sh -k cache -x`. FORGE_REQUIRE_REAL=1 turns skipped
# real-component tests (Docker, QEMU, ...) into failures, as CI does.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
cd "$forge_root"
FORGE_REQUIRE_REAL="${FORGE_REQUIRE_REAL:-}" python -m pytest -q "$@"
