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
python -m scripts.base_train_adaptive_svd \
  --depth=4 \
  --max_seq_len=512 \
  --device_batch_size=1 \
  --eval_tokens=512 \
  --core_metric_every=-1 \
  --total_batch_size=512 \
  --num_iterations=100 \
  --device_type=cpu "$@" 2>&1 | tee phase1_training.log
echo
echo "Phase 1 summary (from phase1_training.log):"
grep -c "=== SVD Analysis at step" phase1_training.log | sed 's/^/  SVD analyses: /'
grep "SWITCHED\|Updated r" phase1_training.log | sed 's/^ */  /' || echo "  no mode switch or rank update"
grep "Validation bpb\|Minimum validation bpb" phase1_training.log | sed 's/^/  /'
ls -l base_checkpoints/d4/ | sed 's/^/  /'
