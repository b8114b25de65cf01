#!/usr/bin/env bash
# Login-node preparation, once, on a machine with internet (Ptolemy: ptolemy-devel-1/2; compute
# nodes have none): the Python environment, the pretraining data, the tokenizer, the CORE evaluation
# bundle and the forgetting experiment's two domains (wiki/, shakespeare/), all where the job files look
# for them. Run it from anywhere:
#
#   bash slurm/prepare_login_node.sh                         # FineWeb-Edu, 240 shards (~24 GB, what d20 needs)
#   NUM_SHARDS=8 bash slurm/prepare_login_node.sh            # enough for Phase 1 and 2
#   DATA_SOURCE=offline bash slurm/prepare_login_node.sh     # no internet: the offline corpus (~10 M chars)
#
# Env (all optional): DATA_SOURCE=fineweb|offline, NUM_SHARDS (240), VOCAB_SIZE (65536),
# TOK_MAX_CHARS (2000000000), EVAL_BUNDLE=1|0 (1 with fineweb), SKIP_SETUP=1 (keep .venv as it is),
# PREPARE_DATA_ARGS / TOK_TRAIN_ARGS (extra flags), TORCH_SPEC (for setup.sh), and the variables of
# slurm/common.sh (NANOCHAT_SCRATCH, NANOCHAT_BASE_DIR, NANOCHAT_CACHE, NANOCHAT_MODULES, ...).
# Steps already done (data present, tokenizer trained) are skipped; delete them to redo.
set -euo pipefail
NANOCHAT_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$NANOCHAT_REPO/slurm/common.sh"
cd "$NANOCHAT_REPO"
nanochat_env
DATA_SOURCE=${DATA_SOURCE:-fineweb}
NUM_SHARDS=${NUM_SHARDS:-240}
VOCAB_SIZE=${VOCAB_SIZE:-65536}
TOK_MAX_CHARS=${TOK_MAX_CHARS:-2000000000}
if [ "$DATA_SOURCE" = fineweb ]; then EVAL_BUNDLE=${EVAL_BUNDLE:-1}; else EVAL_BUNDLE=${EVAL_BUNDLE:-0}; fi
read -r -a PREPARE_EXTRA <<< "${PREPARE_DATA_ARGS:-}"
read -r -a TOK_EXTRA <<< "${TOK_TRAIN_ARGS:-}"
case "$DATA_SOURCE" in fineweb|offline) ;; *) nanochat_die "DATA_SOURCE must be fineweb or offline, not '$DATA_SOURCE'" ;; esac

echo "=== nanochat login-node preparation | $(hostname -s) | $(date '+%Y-%m-%d %H:%M:%S') ==="
echo "Project: $NANOCHAT_REPO | base dir: $NANOCHAT_BASE_DIR | caches: $NANOCHAT_CACHE"
mkdir -p "$NANOCHAT_BASE_DIR" "$NANOCHAT_CACHE"
nanochat_modules

echo "--- 1/5 Python environment (.venv)"
if [ "${SKIP_SETUP:-0}" = 1 ]; then
    echo "SKIP_SETUP=1: using $PY as it is"
else
    bash setup.sh
fi
nanochat_check_python

echo "--- 2/5 pretraining data ($DATA_SOURCE) in $NANOCHAT_BASE_DIR/base_data"
if [ "$DATA_SOURCE" = fineweb ]; then
    # downloads only the shards that are missing, with retries
    "$PY" -m scripts.prepare_data --source=fineweb --num_shards="$NUM_SHARDS" ${PREPARE_EXTRA[@]+"${PREPARE_EXTRA[@]}"}
elif [ -f "$NANOCHAT_BASE_DIR/base_data/val_00000.parquet" ]; then
    echo "already there; delete $NANOCHAT_BASE_DIR/base_data to rebuild it"
else
    "$PY" -m scripts.prepare_data --source=offline ${PREPARE_EXTRA[@]+"${PREPARE_EXTRA[@]}"}
fi

echo "--- 3/5 tokenizer (vocab $VOCAB_SIZE) in $NANOCHAT_BASE_DIR/tokenizer"
if [ -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.json" ] && [ -f "$NANOCHAT_BASE_DIR/tokenizer/token_bytes.pt" ]; then
    echo "already trained; delete $NANOCHAT_BASE_DIR/tokenizer to retrain it"
else
    "$PY" -m scripts.tok_train --vocab_size="$VOCAB_SIZE" --max_chars="$TOK_MAX_CHARS" ${TOK_EXTRA[@]+"${TOK_EXTRA[@]}"}
fi

echo "--- 4/5 CORE evaluation bundle"
if [ "$EVAL_BUNDLE" = 1 ]; then
    "$PY" -m scripts.base_eval --download_bundle
else
    echo "skipped (EVAL_BUNDLE=0); the Phase 3 jobs need it unless CORE_EVERY=-1: python -m scripts.base_eval --download_bundle"
fi

echo "--- 5/5 the forgetting experiment's domains (offline: Wikipedia lead sections, Shakespeare)"
for domain in wiki shakespeare; do
    if [ -f "$NANOCHAT_BASE_DIR/$domain/val_00000.parquet" ]; then
        echo "$domain: already there; delete $NANOCHAT_BASE_DIR/$domain to rebuild it"
    else
        "$PY" -m scripts.prepare_data --source=offline --domains="$domain" --data_dir="$NANOCHAT_BASE_DIR/$domain"
    fi
done

nanochat_check_data
echo "=== ready: submit from $NANOCHAT_REPO, e.g. sbatch slurm/phase1_cpu.sbatch ==="
