#!/bin/bash
# The first batch of the v3 forgetting protocol (experiments/FORGETTING_RESULTS.md, "v3 protocol"): where the
# forgetting lives, the two middle doses, both detectors and the A -> A control, 5 seeds, at v2's scale (d4, 1,500 A-
# + 500 B-steps of 256 tokens, A's and B's val bpb every 50 B-steps, an analysis every 25 steps), fp32, two runs at a
# time with one thread each. Every run has stage 1's exact command, so stage 1 (the same --out) reuses them.
#
#   bash experiments/run_v3_localisation.sh            # runs it (the estimate: FORGETTING_RESULTS.md, "Time")
#   DRY_RUN=1 bash experiments/run_v3_localisation.sh  # prints the command, runs nothing
#
# Env: NANOCHAT_BASE_DIR (/tmp/evid/base: tokenizer, wiki/ and shakespeare/ as FORGETTING_RESULTS.md prepares them),
# OUT (/tmp/evid/fg3), PYTHON (.venv/bin/python). Stopped (Ctrl-C, SIGTERM), the runs save; the same command continues.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-/tmp/evid/base}
BASE=$NANOCHAT_BASE_DIR
PYTHON=${PYTHON:-.venv/bin/python}
CMD=("$PYTHON" -m scripts.forgetting --data_a="$BASE/wiki" --data_b="$BASE/shakespeare" --steps_a=1500 --steps_b=500
     --measure_every=50 --eval_every_a=250 --seeds=42,43,44,45,46 --jobs=2 --out="${OUT:-/tmp/evid/fg3}"
     --arms=baseline,freeze_embed,freeze_blocks,control,static_f25,static_f50,adaptive,shift
     -- --depth=4 --max_seq_len=256 --device_batch_size=1 --total_batch_size=256 --eval_tokens=32768 --device_type=cpu
     --svd_interval=25 --dtype=float32)
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${CMD[@]}"; echo
    exit 0
fi
for d in "$BASE/wiki" "$BASE/shakespeare"; do
    [ -f "$d/val_00000.parquet" ] || { echo "error: no prepared domain in $d; prepare both as experiments/FORGETTING_RESULTS.md shows (v3 protocol), or set NANOCHAT_BASE_DIR" >&2; exit 2; }
done
uptime
time "${CMD[@]}"
uptime
