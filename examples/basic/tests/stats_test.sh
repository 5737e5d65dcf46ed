#!/bin/sh
# Run by `forge test` in a scratch directory that holds this script and the
# files of its `data` attribute, at their paths under forge-out/.
set -eu
grep -qx "lines: 3" forge-out/stats.txt
grep -qx "forge example" forge-out/title.txt
grep -qx "forge example" forge-out/lib/about.txt
echo "all checks passed"
