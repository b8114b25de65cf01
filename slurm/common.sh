# shellcheck shell=bash
# Shared by the job files in slurm/ and by prepare_login_node.sh: sourced, never run on its own.
#
# Every cluster fact (the researcher's "Ptolemy" cluster, experiments/CLUSTER_GUIDE.md) is only a default here. Override it
# from the environment when submitting, never by editing a file, e.g.
#   NANOCHAT_SCRATCH=/scratch/me NANOCHAT_MODULES="python/3.11" sbatch slurm/phase2_gpu.sbatch
# and override the #SBATCH lines with sbatch options (command line beats SBATCH_* environment
# variables, which beat the file):
#   sbatch --account=other --partition=gpu-h100 --gres=gpu:h100:8 --time=06:00:00 slurm/phase3_adaptive.sbatch
#
# Variables (all optional):
#   NANOCHAT_SCRATCH   per-user scratch root           default /scratch/ptolemy/users/$USER
#   NANOCHAT_BASE_DIR  data, tokenizer, eval bundle   default $NANOCHAT_SCRATCH/nanochat-cache
#   NANOCHAT_CACHE     HF / torch / pip / uv caches    default $NANOCHAT_SCRATCH/cache
#   NANOCHAT_RUNS      one folder per job kind         default $NANOCHAT_SCRATCH/nanochat-runs
#   OUTPUT_DIR         this job's run folder           default $NANOCHAT_RUNS/<job kind>
#   MODEL_TAG          checkpoint folder name          default d<depth> (adaptive), d<depth>_baseline
#   NANOCHAT_MODULES   modules to load ("" = none)     default spack-managed-x86-64_v3/v1.0 python/3.12.5 cuda-toolkit
#   NANOCHAT_PYTHON    the Python to run               default <project>/.venv/bin/python
#   NANOCHAT_RESUME    auto | 1 | 0                    auto = continue an unfinished checkpoint of this run; 0 = start over (replaces it)
#   NANOCHAT_REQUEUE   1 | 0                           1 = requeue the job after a pre-timeout save
#   NANOCHAT_DRY_RUN   1 = print the command, run nothing
#   WANDB_MODE (offline), WANDB_RUN (job kind), OMP_NUM_THREADS (1)

nanochat_die() {
    echo "error: $*" >&2
    exit 2
}

# Defaults for every cluster fact, exported for the Python processes.
nanochat_env() {
    : "${USER:=$(id -un)}"
    : "${NANOCHAT_SCRATCH:=/scratch/ptolemy/users/$USER}"
    : "${NANOCHAT_BASE_DIR:=$NANOCHAT_SCRATCH/nanochat-cache}"
    : "${NANOCHAT_CACHE:=$NANOCHAT_SCRATCH/cache}"
    : "${NANOCHAT_RUNS:=$NANOCHAT_SCRATCH/nanochat-runs}"
    : "${NANOCHAT_MODULES=spack-managed-x86-64_v3/v1.0 python/3.12.5 cuda-toolkit}"  # '=': an empty value loads none
    : "${NANOCHAT_PYTHON:=$NANOCHAT_REPO/.venv/bin/python}"
    : "${WANDB_MODE:=offline}"
    : "${OMP_NUM_THREADS:=1}"
    : "${HF_HOME:=$NANOCHAT_CACHE/huggingface}"
    : "${TORCH_HOME:=$NANOCHAT_CACHE/torch}"
    : "${PIP_CACHE_DIR:=$NANOCHAT_CACHE/pip}"
    : "${UV_CACHE_DIR:=$NANOCHAT_CACHE/uv}"
    : "${TRITON_CACHE_DIR:=$NANOCHAT_CACHE/triton}"
    : "${TORCHINDUCTOR_CACHE_DIR:=$NANOCHAT_CACHE/inductor}"
    export NANOCHAT_BASE_DIR WANDB_MODE OMP_NUM_THREADS HF_HOME TORCH_HOME PIP_CACHE_DIR UV_CACHE_DIR \
        TRITON_CACHE_DIR TORCHINDUCTOR_CACHE_DIR
    PY=$NANOCHAT_PYTHON
}

# `module load $NANOCHAT_MODULES`, finding the module command where batch shells lack it.
nanochat_modules() {
    [ -n "$NANOCHAT_MODULES" ] || return 0
    if ! type module >/dev/null 2>&1; then
        local init
        for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
            if [ -f "$init" ]; then
                set +u
                # shellcheck disable=SC1090
                source "$init"
                set -u
                break
            fi
        done
    fi
    if type module >/dev/null 2>&1; then
        echo "Loading modules: $NANOCHAT_MODULES"
        set +u  # module scripts read unset variables
        # shellcheck disable=SC2086
        module load $NANOCHAT_MODULES
        set -u
    else
        echo "warning: no 'module' command on $(hostname -s); not loading NANOCHAT_MODULES=\"$NANOCHAT_MODULES\" (set NANOCHAT_MODULES= to silence)" >&2
    fi
}

nanochat_check_python() {
    [ -x "$PY" ] || nanochat_die "no Python environment at $PY. On a login node with internet run: bash slurm/prepare_login_node.sh (or set NANOCHAT_PYTHON)"
}

# The data and tokenizer must have been prepared on a login node: compute nodes have no internet.
nanochat_check_data() {
    local data=$NANOCHAT_BASE_DIR/base_data tok=$NANOCHAT_BASE_DIR/tokenizer
    local fix="prepare them on a login node with internet: NANOCHAT_BASE_DIR=$NANOCHAT_BASE_DIR bash slurm/prepare_login_node.sh"
    if ! compgen -G "$data/train_*.parquet" >/dev/null || [ ! -f "$data/val_00000.parquet" ]; then
        nanochat_die "no training data in $data (need train_*.parquet and val_00000.parquet); $fix"
    fi
    if [ ! -f "$tok/tokenizer.json" ] || [ ! -f "$tok/token_bytes.pt" ]; then
        nanochat_die "no tokenizer in $tok (need tokenizer.json and token_bytes.pt); $fix"
    fi
}

# Flags the job sets itself from the environment must not come in as extra arguments too.
nanochat_check_args() {
    local arg
    for arg in "$@"; do
        case "$arg" in
            --depth|--depth=*) nanochat_die "set DEPTH=... in the environment instead of passing $arg (it also names the checkpoint)" ;;
            --model_tag*|--model-tag*) nanochat_die "set MODEL_TAG=... in the environment instead of passing $arg" ;;
            --output_dir*|--output-dir*) nanochat_die "set OUTPUT_DIR=... in the environment instead of passing $arg" ;;
            --resume*) nanochat_die "resuming is automatic (NANOCHAT_RESUME=auto|1|0); do not pass $arg" ;;
        esac
    done
}

# complete | partial | none: the state of the run whose checkpoint folder is $1.
nanochat_run_state() {
    local cfg=$1/config.json
    if [ ! -f "$1/checkpoint.pt" ] || [ ! -f "$cfg" ]; then
        echo none
        return 0
    fi
    "$PY" - "$cfg" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
print("complete" if c["step"] >= c["num_iterations"] else f"partial {c['step']} {c['num_iterations']}")
EOF
}

# Sets RESUME_FLAG to --resume when this run has an unfinished checkpoint (a requeued or resubmitted
# job), to --overwrite=true when the run is to start over (the training script refuses to replace a
# run without it); stops the job when the run is already complete.
# Nothing here writes to the folder: a temp file a killed save left (checkpoint.pt itself is only ever
# replaced whole) is removed by the training process, under the folder's lock, so that a job that
# overlaps a running one (a double submission, an early requeue) never deletes that run's files.
nanochat_resume() {
    local dir=$1 mode=${NANOCHAT_RESUME:-auto} state
    RESUME_FLAG=""
    if [ "$mode" = 0 ]; then
        [ -d "$dir" ] && RESUME_FLAG=--overwrite=true
        return 0
    fi
    state=$(nanochat_run_state "$dir")
    case "$state" in
        complete)
            if [ "$mode" = 1 ]; then
                RESUME_FLAG=--resume
            else
                echo "The run in $dir is complete; nothing to do (set OUTPUT_DIR or MODEL_TAG for a new run, NANOCHAT_RESUME=1 to continue it anyway)"
                exit 0
            fi ;;
        partial*)
            # shellcheck disable=SC2086
            set -- $state
            echo "Continuing the run in $dir from its checkpoint at step $2 of $3 (--resume)"
            RESUME_FLAG=--resume ;;
        none)
            if [ -f "$dir/checkpoint.pt" ]; then
                # killed between writing checkpoint.pt and config.json: --resume rewrites config.json
                echo "Continuing the run in $dir from its checkpoint (--resume)"
                RESUME_FLAG=--resume
            elif [ "$mode" = 1 ]; then
                nanochat_die "NANOCHAT_RESUME=1 but there is no checkpoint in $dir"
            elif compgen -G "$dir/*.jsonl" >/dev/null; then
                echo "The run in $dir stopped before its first checkpoint; starting it again (--overwrite=true)"
                RESUME_FLAG=--overwrite=true
            fi ;;
    esac
    return 0
}

# Everything before the training command: defaults, modules, Python, data, the run folder, resume.
# $1 = job kind (names the run folder and the wandb run), $2 = the checkpoint tag, then the extra args.
nanochat_setup() {
    NANOCHAT_KIND=$1
    local tag=$2
    shift 2
    NANOCHAT_EXTRA=("$@")
    nanochat_env
    nanochat_check_args "$@"
    : "${OUTPUT_DIR:=$NANOCHAT_RUNS/$NANOCHAT_KIND}"
    : "${WANDB_RUN:=$NANOCHAT_KIND}"
    : "${WANDB_DIR:=$OUTPUT_DIR}"
    MODEL_TAG=${MODEL_TAG:-$tag}
    export WANDB_DIR
    echo "=== nanochat $NANOCHAT_KIND | job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-no slurm}) | restart ${SLURM_RESTART_COUNT:-0} |" \
         "nodes ${SLURM_JOB_NODELIST:-$(hostname -s)} | $(date '+%Y-%m-%d %H:%M:%S') ==="
    nanochat_modules
    nanochat_check_python
    nanochat_check_data
    mkdir -p "$OUTPUT_DIR"
    echo "Project: $NANOCHAT_REPO | data and tokenizer: $NANOCHAT_BASE_DIR | run: $OUTPUT_DIR/base_checkpoints/$MODEL_TAG"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L || true
    fi
    nanochat_resume "$OUTPUT_DIR/base_checkpoints/$MODEL_TAG"
}

# Extra arguments win over the job's own flags (the last flag wins): the words after the training
# script's `-m scripts.X` are its own flags, and nanochat.cli's merge (the one the Python runners use)
# leaves out each that an extra argument gives again, in either form (--a_b/--a-b, --x=v/--x v), and
# appends the extra arguments whole; the script rejects a flag the user repeats. Sets NANOCHAT_CMD to
# the command to run.
nanochat_override() {
    local own=$(($# - ${#NANOCHAT_EXTRA[@]})) word merged script=0
    local -a launcher=() flags=()
    for word in "${@:1:$own}"; do
        if [ "$script" = 1 ]; then
            flags+=("$word")
        else
            launcher+=("$word")
        fi
        if [[ $word == scripts.* ]]; then
            script=1
        fi
    done
    merged=$("$PY" -m nanochat.cli merge "${#flags[@]}" ${flags[@]+"${flags[@]}"} \
        ${NANOCHAT_EXTRA[@]+"${NANOCHAT_EXTRA[@]}"}) || nanochat_die "could not merge the extra arguments into the job's command"
    eval "NANOCHAT_CMD=(\"\${launcher[@]}\" $merged)"  # merged is shell-quoted (shlex.join)
}

nanochat_forward() {
    NANOCHAT_STOP=$1
    echo "$(date '+%H:%M:%S') job: got SIG$1; asking the training processes to save a checkpoint and stop"
    kill -s "$1" -- "-$NANOCHAT_CHILD" 2>/dev/null || true
}

# Run the training command in its own process group, with SIGUSR1 (SLURM's warning before the time
# limit, --signal=B:USR1@N) and SIGTERM forwarded to every process of it. A local launcher (python,
# torchrun) is started with SIGUSR1 ignored, so only the Python training processes, which install a
# handler, react; srun instead forwards the signal to its tasks, which ignore it themselves (see
# phase3_multinode.sbatch). After a save on SIGUSR1 the job requeues itself; the requeued job
# resumes from the checkpoint. A training process that a forwarded signal stopped exits with 128 +
# the signal (138 for USR1, 143 for TERM) after its save; under torchrun with 0 (torchrun reports any
# other worker status as its own failure); any other status is a failure and is passed on.
nanochat_launch() {
    nanochat_override "$@"
    set -- "${NANOCHAT_CMD[@]}"
    echo "+ $*"
    if [ "${NANOCHAT_DRY_RUN:-0}" = 1 ]; then
        return 0
    fi
    NANOCHAT_STOP=""
    set -m
    if [ "$(basename "$1")" = srun ]; then
        "$@" &  # srun forwards the signals it gets to its tasks; the tasks ignore SIGUSR1 themselves
    else
        (trap '' USR1; exec "$@") &
    fi
    NANOCHAT_CHILD=$!
    set +m
    trap 'nanochat_forward USR1' USR1
    trap 'nanochat_forward TERM' TERM
    local rc=0 last
    wait "$NANOCHAT_CHILD" || rc=$?
    while kill -0 "$NANOCHAT_CHILD" 2>/dev/null; do  # a trapped signal interrupts wait (status 128 + it); wait again
        rc=0
        wait "$NANOCHAT_CHILD" || rc=$?
    done
    # the child's own status: a wait that a trapped signal interrupted returned 128 + that signal, and the
    # child may have ended, and been reaped, before kill -0 looked; bash keeps the status of its ended
    # children (127 where it kept none)
    wait "$NANOCHAT_CHILD" 2>/dev/null && last=0 || last=$?
    [ "$last" = 127 ] || rc=$last
    trap - USR1 TERM
    echo "$(date '+%H:%M:%S') job: training exited with status $rc"
    if [ -z "$NANOCHAT_STOP" ]; then
        return "$rc"
    fi
    if [ "$rc" != 0 ] && [ "$rc" != $((128 + $(kill -l "$NANOCHAT_STOP"))) ]; then
        return "$rc"
    fi
    local state
    state=$(nanochat_run_state "$OUTPUT_DIR/base_checkpoints/$MODEL_TAG")
    if [ "$state" = complete ]; then
        return 0
    fi
    if [ "$NANOCHAT_STOP" = USR1 ] && [ "${NANOCHAT_REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "job: checkpoint saved ($state); requeueing job $SLURM_JOB_ID, it continues with --resume"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        echo "job: scontrol requeue failed" >&2
    fi
    echo "job: checkpoint saved ($state); submit the same job again (same OUTPUT_DIR/MODEL_TAG) to continue it"
    return 75
}
