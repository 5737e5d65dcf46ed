#!/bin/sh
# Usage: count.sh FILE. Prints how many lines and words FILE has.
set -eu
echo "lines: $(wc -l < "$1")"
echo "words: $(wc -w < "$1")"
