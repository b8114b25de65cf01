#!/usr/bin/env bash
# The main job: set up .venv, prepare the offline corpus and the tokenizer (once), then run the
# researcher's Phase 1 command verbatim (adaptive SVD on block0.attn.c_q, depth 4, 100 steps, CPU).
# Data and tokenizer go to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat); the checkpoint and
# svd_metrics.jsonl to ./base_checkpoints/d4/. The log is also written to phase1_training.log.
# A second run stops rather than replace the first: `bash run_phase1.sh --overwrite=true` replaces it
# (arguments are appended to the training command).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
BASE=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
if [ ! -f "$BASE/base_data/val_00000.parquet" ]; then
    .venv/bin/python -m scripts.prepare_data
fi
if [ ! -f "$BASE/tokenizer/tokenizer.json" ]; then
    .venv/bin/python -m scripts.tok_train
fi
source .venv/bin/activate

# The log goes to a new file first: a run that trains nothing (refused, bad flag) leaves the previous
# run's phase1_training.log as it was; a --resume run's log is appended to it.
LOG=phase1_training.log
NEW=$(mktemp phase1_training.XXXXXX.tmp)
keep_log() {  # after the run, and on exit (Ctrl-C) if it has not run yet
    [ -f "$NEW" ] || return 0
    if ! grep -qE "^step [0-9]{5}/" "$NEW"; then
        rm -f "$NEW"  # nothing trained; its lines are already on the terminal
    elif [[ " $* " == *" --resume"* ]]; then
        cat "$NEW" >> "$LOG" && rm -f "$NEW"
    else
        mv "$NEW" "$LOG"
    fi
}
trap 'keep_log "$@"' EXIT
set +e
python -m scripts.base_train_adaptive_svd \
  --depth=4 \
  --max_seq_len=512 \
  --device_batch_size=1 \
  --eval_tokens=512 \
  --core_metric_every=-1 \
  --total_batch_size=512 \
  --num_iterations=100 \
  --device_type=cpu "$@" 2>&1 | tee "$NEW"
status=${PIPESTATUS[0]}
set -e
keep_log "$@"
[ "$status" -eq 0 ] || exit "$status"
echo
echo "Phase 1 summary (from phase1_training.log):"
grep -c "=== SVD Analysis at step" phase1_training.log | sed 's/^/  SVD analyses: /'
grep "SWITCHED\|Updated r" phase1_training.log | sed 's/^ */  /' || echo "  no mode switch or rank update"
grep "Validation bpb\|Minimum validation bpb" phase1_training.log | sed 's/^/  /'
ls -l base_checkpoints/d4/ | sed 's/^/  /'
