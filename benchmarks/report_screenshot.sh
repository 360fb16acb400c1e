#!/usr/bin/env bash
# The HTML report of a committed grid (default: the MiniLM Standard grid), written into a new temporary
# folder and screenshotted by headless Chromium (Debian: apt-get install chromium), to look at by eye:
#   benchmarks/report_screenshot.sh [GRID.toml] [RESULTS_DIR] [WIDTHxHEIGHT]
# Only the grid's runs/ are read (copied out first): nothing is written under benchmarks/results.
# Prints the folder, which holds report.html, table.md, plots/ and report.png.
set -euo pipefail
grid=${1:-benchmarks/standard.toml} results=${2:-benchmarks/results/standard} size=${3:-1280x2000}
PY=${PYTHON:-python3}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome) \
  || { echo "no chromium binary: apt-get install chromium" >&2; exit 1; }
out=$(mktemp -d)/$(basename "$results")
mkdir -p "$out" && cp -r "$results/runs" "$out/"
"$PY" -m rkif bench "$grid" --report --html --out "$out" > "$out/bench.log" 2>&1
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${size/x/,}" \
  --screenshot="$out/report.png" "file://$(realpath "$out/report.html")" 2> /dev/null
echo "$out"
