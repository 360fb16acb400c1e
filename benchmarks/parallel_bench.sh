#!/usr/bin/env bash
# Run a grid with N `rkif bench` workers at once (they share it through the runs' lock files) until a
# deadline, then pack the finished runs' results.json into one archive. For one GPU, where a small model
# leaves the device mostly idle and one process per run fills it.
#   benchmarks/parallel_bench.sh GRID.toml OUT_DIR WORKERS SECONDS [ARCHIVE] [-- extra rkif bench args]
# Unfinished runs are left behind (resumable where they ran); the archive holds finished runs only.
set -uo pipefail
grid=$1 out=$2 workers=$3 seconds=$4 archive=${5:-}
shift $(( $# < 5 ? $# : 5 )); [ "${1:-}" = "--" ] && shift
PY=${PYTHON:-python3}
# one share of the cores each: N processes at torch's default (every core each) oversubscribe the CPU
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))}
mkdir -p "$out"
for i in $(seq 1 "$workers"); do
  timeout --signal=INT --kill-after=15 "$seconds" "$PY" -m rkif bench "$grid" --out "$out" "$@" \
    > "$out/worker$i.log" 2>&1 &
  sleep 2                  # workers claim different runs in turn
done
wait
finished=$(cd "$out" && grep -l '"complete": true' runs/*/*/results.json 2>/dev/null)
echo "finished runs: $(echo "$finished" | grep -c results.json)"
if [ -n "$archive" ] && [ -n "$finished" ]; then
  tar -C "$out" -czf "$archive" $finished worker*.log && echo "packed into $archive"
fi
