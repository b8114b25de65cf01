"""The SLURM job files in slurm/.

Without SLURM (default selection): every command line of every job file passes only flags its target script defines
(read from the file, and from what the file really runs in dry-run mode), the files are strict bash,
and missing data or environment give a clear message.

Under a real one-machine SLURM, only with `-m slurm` (tests/slurm_cluster.py installs slurm-wlm and munge with apt when
absent, starts munged, slurmctld and slurmd with a generated CPU-only slurm.conf and stops only
those): the real job files are submitted with the cluster facts overridden by sbatch options and
environment, as a user on another cluster would: Phase 1 completes; a job signalled with
`scancel --signal=USR1 --batch` (what `--signal=B:USR1@N` does before the time limit) saves,
requeues itself and resumes to exactly the result of an uninterrupted run; a 2-task job (srun + two
torchruns meeting at a c10d rendezvous) and a 2-process torchrun job run the gloo path; a 2-task
job resumes exactly too, and SLURM's own time-limit warning fires (these two take about a minute each).
"""

import dataclasses
import glob
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat.cli import merge_flags, parse_args
from nanochat.common import UserError
from tests.conftest import ROOT, free_port
from tests.slurm_cluster import CRED_EXPIRE, LocalSlurm, ensure_slurm

SLURM_DIR = os.path.join(ROOT, "slurm")
JOB_FILES = sorted(glob.glob(os.path.join(SLURM_DIR, "*.sbatch")))
SHELL_FILES = JOB_FILES + [os.path.join(SLURM_DIR, "prepare_login_node.sh"), os.path.join(SLURM_DIR, "common.sh")]
WRAPPERS = {"phase3_adaptive.sbatch": "adaptive", "phase3_baseline.sbatch": "baseline"}  # phase3.sbatch, KIND fixed


# -- the flags each entry point defines ------------------------------------------------------------

CONFIGS = {  # the entry points the job files run: module -> (module of its config class, the class)
    "scripts.base_train": ("nanochat.train", "TrainConfig"),
    "scripts.base_train_adaptive_svd": ("nanochat.adaptive_cycle", "AdaptiveConfig"),
    "scripts.tok_train": ("scripts.tok_train", "TokTrainConfig"),
    "scripts.base_eval": ("scripts.base_eval", "EvalConfig"),
    "scripts.prepare_data": ("scripts.prepare_data", "PrepareConfig"),
    "scripts.gpu_check": ("scripts.gpu_check", "CheckConfig"),
    "scripts.forgetting": ("nanochat.forgetting", "ForgettingConfig"),
}
RUNNERS = {"scripts.forgetting"}  # their flags after `--` are the training runs' (scripts.base_train_adaptive_svd)


def config_class(module):
    assert module in CONFIGS, f"a job file runs {module}, which this test does not know: add it to CONFIGS"
    where, name = CONFIGS[module]
    return getattr(importlib.import_module(where), name)


def script_flags(module):
    """The flags an entry point defines: the fields of its config dataclass."""
    return {f.name for f in dataclasses.fields(config_class(module))}


# -- reading the command lines of a job file -------------------------------------------------------

def logical_lines(text):
    """Lines with backslash continuations joined and comments (including #SBATCH) dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not current and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    return [line for line in out if line.strip()]


def arrays(text):
    """NAME=(...) definitions in a file: {NAME: [words]} (all definitions of a name together)."""
    found = {}
    for m in re.finditer(r"^\s*(\w+)\+?=\(([^)]*)\)", text, re.M):
        found.setdefault(m.group(1), []).extend(shlex.split(m.group(2), comments=True))
    return found


def commands(path):
    """[(module, [flag names], line)] for every `-m scripts.X ...` in a job file, arrays expanded. A runner's flags
    after its `--` are listed as a second command of scripts.base_train_adaptive_svd."""
    text = open(path).read()
    defined = arrays(text)
    result = []
    for line in logical_lines(text):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, w in enumerate(words[:-1]):
            if w != "-m" or not words[i + 1].startswith("scripts."):
                continue
            module, flags, train = words[i + 1], [], None
            for w2 in words[i + 2:]:
                if w2 == "--":  # torchrun drops it: the end of the launcher's own options; a runner's training flags follow
                    if module in RUNNERS:
                        train = []
                    continue
                into = flags if train is None else train
                for name, values in defined.items():
                    if "${" + name + "[@]" in w2:  # "${NAME[@]}" or ${NAME[@]+"${NAME[@]}"}
                        into += [v.split("=", 1)[0][2:] for v in values if v.startswith("--")]
                if w2.startswith("--"):
                    into.append(w2.split("=", 1)[0][2:].replace("-", "_"))
            result.append((module, flags, line))
            if train is not None:
                result.append(("scripts.base_train_adaptive_svd", train, line))
    return result


@pytest.mark.parametrize("path", SHELL_FILES, ids=os.path.basename)
def test_every_flag_of_every_command_exists_in_its_script(path):
    found = commands(path)
    if path.endswith("common.sh") or os.path.basename(path) in WRAPPERS:
        assert found == []
        return
    assert found, f"{path} runs no `-m scripts.X` command"
    for module, flags, line in found:
        known = script_flags(module)
        unknown = [f for f in flags if f not in known]
        assert not unknown, f"{os.path.basename(path)} passes {unknown} to {module}, which does not define them: {line[:200]}"
        if path in JOB_FILES:  # the extra arguments come last: nanochat_launch lets them replace the job's flags
            assert line.rstrip().endswith('"$@"'), line[-200:]


def test_the_parser_sees_the_training_commands():
    by_file = {os.path.basename(p): commands(p) for p in JOB_FILES}
    assert [m for m, _, _ in by_file["phase1_cpu.sbatch"]] == ["scripts.base_train_adaptive_svd"]
    assert sorted(m for m, _, _ in by_file["phase2_gpu.sbatch"]) == ["scripts.base_train", "scripts.base_train_adaptive_svd"]
    assert sorted(m for m, _, _ in by_file["phase3_multinode.sbatch"]) == ["scripts.base_train", "scripts.base_train_adaptive_svd"]
    phase3 = {m: flags for m, flags, _ in by_file["phase3.sbatch"]}
    assert sorted(phase3) == ["scripts.base_train", "scripts.base_train_adaptive_svd"]
    assert set(phase3["scripts.base_train_adaptive_svd"]) - set(phase3["scripts.base_train"]) == {
        "adaptive_svd_target_layer", "svd_targets", "svd_interval"}
    phase1 = by_file["phase1_cpu.sbatch"][0][1]
    for researcher_flag in ("depth", "max_seq_len", "device_batch_size", "eval_tokens", "core_metric_every",
                            "total_batch_size", "num_iterations", "device_type"):
        assert researcher_flag in phase1
    assert "scripts.prepare_data" in {m for m, _, _ in commands(os.path.join(SLURM_DIR, "prepare_login_node.sh"))}


@pytest.mark.parametrize("path", JOB_FILES, ids=os.path.basename)
def test_job_files_are_strict_and_ask_for_a_warning_signal(path):
    text = open(path).read()
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
    body = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert body[0] == "set -euo pipefail"
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, re.M))
    assert sbatch["account"] == "class-cse8990"
    assert sbatch["output"] == "slurm/logs/%x-%j.out" and sbatch["open-mode"] == "append"
    if "gpu_check" in path:  # a check has nothing to save or resume: no warning signal, no requeue
        assert sbatch["time"] == "00:20:00" and sbatch["gres"] == "gpu:a100:1" and "requeue" not in sbatch
        return
    assert "requeue" in sbatch and re.fullmatch(r"B:USR1@\d+", sbatch["signal"])
    if "phase3" in path or "phase2" in path:
        assert sbatch["partition"] == "gpu-a100" and sbatch["gres"].startswith("gpu:a100:")
    if "phase3" in path:
        assert sbatch["gres"] == "gpu:a100:8" and sbatch["time"] == "12:00:00"
        assert sbatch["cpus-per-task"] == "16" and sbatch["mem"] == "256G"


@pytest.mark.parametrize("name,kind", WRAPPERS.items())
def test_a_phase3_wrapper_is_the_shared_job_with_its_kind_fixed(name, kind):
    """sbatch reads #SBATCH lines only from the submitted file: a wrapper repeats phase3.sbatch's but its
    job name, and runs phase3.sbatch in its own process (exec), so the batch shell's signals reach it."""
    text, shared = open(os.path.join(SLURM_DIR, name)).read(), open(os.path.join(SLURM_DIR, "phase3.sbatch")).read()
    options = lambda t: re.findall(r"^#SBATCH (--(?!job-name)\S+)", t, re.M)
    assert options(text) == options(shared) and f"#SBATCH --job-name=nanochat-phase3-{kind}\n" in text
    assert logical_lines(text)[-1].startswith(f'KIND={kind} NANOCHAT_REPO=$NANOCHAT_REPO exec bash "$NANOCHAT_REPO/slurm/phase3.sbatch" "$@"')


# -- running the job files with bash (no SLURM needed) ---------------------------------------------

def job_env(base, runs, **extra):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_RUNS=str(runs), NANOCHAT_MODULES="",
               NANOCHAT_PYTHON=sys.executable, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_"))]:
        del env[key]
    env.update({k: str(v) for k, v in extra.items()})
    return env


def printed_command(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("+ "))
    return shlex.split(line[2:])


@pytest.mark.parametrize("path,extra", [
    ("phase1_cpu.sbatch", {}),
    ("phase2_gpu.sbatch", {}),
    ("phase2_gpu.sbatch", {"KIND": "baseline"}),
    ("phase3.sbatch", {}),
    ("phase3.sbatch", {"KIND": "baseline"}),
    ("phase3_adaptive.sbatch", {}),
    ("phase3_baseline.sbatch", {"KIND": "adaptive"}),  # the wrapper's own KIND wins
    ("phase3_multinode.sbatch", {}),
    ("phase3_multinode.sbatch", {"KIND": "baseline"}),
])
def test_dry_run_commands_parse_with_the_scripts_own_parser(prepared_base, tmp_path, path, extra):
    """Dry run with extra arguments in both forms: they replace the job's own flags of the same name."""
    module, script_args = dry_run(prepared_base, tmp_path, path, ["--eval_every=50", "--sample_every", "7"], **extra)
    cfg = parse_args(config_class(module), script_args, prog=module, description="")
    assert cfg.eval_every == 50 and cfg.sample_every == 7 and cfg.output_dir.startswith(str(tmp_path)) and not cfg.resume
    kind = WRAPPERS.get(path, extra.get("KIND", "adaptive"))
    assert module == ("scripts.base_train" if kind == "baseline" else "scripts.base_train_adaptive_svd")
    if "phase3" in path:
        assert cfg.depth == 20 and cfg.total_batch_size == 524288 and cfg.num_iterations == -1
        assert cfg.output_dir.endswith("_multinode_" + kind if "multinode" in path else "phase3_" + kind)
    if kind == "adaptive" and "phase3" in path:
        assert cfg.svd_targets == "all" and cfg.svd_interval == 100


def dry_run(base, runs, job, args, **env):
    """(module, its arguments) of the command a job prints with NANOCHAT_DRY_RUN=1; checks the launcher."""
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, job), *args], cwd=ROOT, env=job_env(base, runs, NANOCHAT_DRY_RUN=1, **env),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = printed_command(r.stdout)
    i = max(i for i, w in enumerate(argv) if w == "-m" and argv[i + 1].startswith("scripts."))
    script_args = argv[i + 2:]
    if "phase3" in job:
        assert "torch.distributed.run" in argv[:i]
        assert script_args[0] == "--"  # without it torchrun's parser rejects --run=... as ambiguous
        script_args = script_args[1:]  # torchrun drops it
    if "multinode" in job:
        assert argv[0] == "srun" and any(w.startswith("--rdzv_endpoint=") for w in argv[:i])
    return argv[i + 1], script_args


def test_gpu_check_job_runs_the_check_with_extra_flags_replacing_its_own(prepared_base, tmp_path):
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, "gpu_check.sbatch"), "--device_batch_size=16", "--device_type", "cpu"],
                       cwd=ROOT, env=job_env(prepared_base, tmp_path, NANOCHAT_DRY_RUN=1), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    argv = printed_command(r.stdout)
    i = argv.index("-m")
    assert argv[i + 1] == "scripts.gpu_check"
    cfg = parse_args(config_class("scripts.gpu_check"), argv[i + 2:], prog="gpu_check", description="")
    assert cfg.device_batch_size == 16 and cfg.device_type == "cpu" and cfg.out == os.path.join(str(tmp_path), "gpu_check")


def forgetting_job(base, runs, args, domains, **env):
    return subprocess.run(["bash", os.path.join(SLURM_DIR, "forgetting.sbatch"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env=job_env(base, runs, DATA_A=domains["wiki"], DATA_B=domains["shakespeare"], **env))


def test_forgetting_job_runs_the_v3_protocol_with_extra_flags_in_every_training_run(prepared_base, domains, tmp_path):
    from nanochat.adaptive_cycle import AdaptiveConfig
    r = forgetting_job(prepared_base, tmp_path, ["--svd_interval=20", "--matrix_lr", "0.01"], domains, NANOCHAT_DRY_RUN=1)
    assert r.returncode == 0, r.stderr
    argv = printed_command(r.stdout)
    i = argv.index("-m")
    assert argv[i + 1] == "scripts.forgetting"
    cfg = parse_args(config_class("scripts.forgetting"), argv[i + 2:], prog="forgetting", description="")
    assert (cfg.seeds, cfg.arms, cfg.steps_a, cfg.steps_b, cfg.best) == ("42,43,44,45,46", "stage1", 6000, 200, "")
    assert (cfg.data_a, cfg.data_b, cfg.out) == (domains["wiki"], domains["shakespeare"], os.path.join(str(tmp_path), "forgetting_d12"))
    train = parse_args(AdaptiveConfig, cfg.train_flags, prog="train", description="")
    assert (train.depth, train.dtype, train.device_type, train.max_seq_len, train.total_batch_size) == (12, "float32", "cuda", 1024, 16384)
    assert train.svd_interval == 20 and train.matrix_lr == 0.01  # the extra flags replaced the job's own
    r = forgetting_job(prepared_base, tmp_path, ["--depth=8"], domains, NANOCHAT_DRY_RUN=1)
    assert r.returncode == 2 and "set DEPTH=" in r.stderr
    r = forgetting_job(prepared_base, tmp_path, [], dict(domains, shakespeare=str(tmp_path / "none")), NANOCHAT_DRY_RUN=1)
    assert r.returncode == 2 and f"no train and val shards in {tmp_path / 'none'}" in r.stderr


@pytest.mark.slow  # three tiny training runs and the report: about a minute
def test_forgetting_job_tiny_mode_runs_end_to_end_without_slurm(prepared_base, domains, tmp_path):
    r = forgetting_job(prepared_base, tmp_path, [], domains, TINY=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "forgetting_d2"
    data = json.loads((out / "forgetting.json").read_text())
    assert data["settings"]["arms"] == ["baseline", "replay5"] and data["dtypes"] == ["float32"]
    assert sorted(os.listdir(out / "kept")) == ["A_s42", "B_baseline_s42", "B_replay5_s42"]
    again = forgetting_job(prepared_base, tmp_path, [], domains, TINY=1)  # a resubmitted job reuses every run
    assert again.returncode == 0 and again.stdout.count("reusing ") == 3


def test_a_flag_the_user_repeats_reaches_the_script_which_rejects_it(prepared_base, tmp_path):
    module, script_args = dry_run(prepared_base, tmp_path, "phase3.sbatch", ["--eval_every=1", "--eval_every=2"])
    assert script_args.count("--eval_every=1") == 1 and script_args.count("--eval_every=2") == 1
    assert not any(a.startswith("--eval_every=250") for a in script_args)
    with pytest.raises(UserError, match="--eval_every is given twice"):
        parse_args(config_class(module), script_args, prog=module, description="")


def test_a_job_merges_extra_flags_as_the_python_runners_do(prepared_base, tmp_path):
    """The dry run's command with extra arguments is the one without them merged by nanochat.cli.merge_flags."""
    plain = dry_run(prepared_base, tmp_path, "phase1_cpu.sbatch", [])
    extra = ["--eval-every", "50", "--sample_every=7", "--num_iterations=3", "--device-type=cpu"]
    merged = dry_run(prepared_base, tmp_path, "phase1_cpu.sbatch", extra)
    assert merged == (plain[0], merge_flags(plain[1], extra))
    assert "--num_iterations=100" in plain[1] and "--num_iterations=100" not in merged[1]


def test_the_bash_merge_keeps_every_word_whole():
    """nanochat_override itself (no job file): spaces, quotes and `--x v` forms survive the trip through the shell."""
    launcher = ["python", "-m", "torch.distributed.run", "--standalone", "-m", "scripts.base_train", "--"]
    own = ["--run=phase 1", "--eval_every=250", "--model-tag", "it's", "--files", "a b", "c", "--resume"]
    extra = ["--model_tag=new tag", "--files", "$HOME", "--eval-every", "5"]
    script = ('source slurm/common.sh; PY=$1; n=$2; shift 2; NANOCHAT_EXTRA=("${@:$((n + 1))}"); '
              'nanochat_override "$@"; printf "%s\\0" "${NANOCHAT_CMD[@]}"')
    r = subprocess.run(["bash", "-c", script, "job", sys.executable, str(len(launcher + own)), *launcher, *own, *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\0")[:-1] == launcher[:-1] + merge_flags(["--", *own], extra)


def test_missing_data_stops_with_a_clear_message(tmp_path):
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, "phase1_cpu.sbatch")], cwd=ROOT, capture_output=True, text=True,
                       env=job_env(tmp_path / "empty", tmp_path / "runs"), timeout=60)
    assert r.returncode == 2
    assert "error: no training data in" in r.stderr and "bash slurm/prepare_login_node.sh" in r.stderr


def test_missing_environment_and_bad_arguments_stop_with_a_clear_message(prepared_base, tmp_path):
    job = os.path.join(SLURM_DIR, "phase1_cpu.sbatch")
    r = subprocess.run(["bash", job], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=job_env(prepared_base, tmp_path, NANOCHAT_PYTHON=str(tmp_path / "no-venv/bin/python")))
    assert r.returncode == 2 and "no Python environment" in r.stderr and "prepare_login_node.sh" in r.stderr
    r = subprocess.run(["bash", job, "--depth=8"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=job_env(prepared_base, tmp_path))
    assert r.returncode == 2 and "set DEPTH=" in r.stderr
    r = subprocess.run(["bash", job], cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                       env=job_env(prepared_base, tmp_path))
    assert r.returncode == 2 and "not the project root" in r.stderr


def test_a_save_killed_mid_write_is_left_to_the_training_process(prepared_base, tmp_path):
    # the job never deletes in the run folder: the temp file may belong to a save of a run that is still going
    # (an overlapping job); the training process removes it under the folder's lock (tests/test_run_safety.py)
    run = tmp_path / "phase1/base_checkpoints/d4"
    run.mkdir(parents=True)
    (run / "checkpoint.pt.tmp.4242").write_bytes(b"half a checkpoint")
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, "phase1_cpu.sbatch")], cwd=ROOT, capture_output=True, text=True,
                       env=job_env(prepared_base, tmp_path, NANOCHAT_DRY_RUN=1), timeout=60)
    assert r.returncode == 0 and "--resume" not in printed_command(r.stdout) and "--overwrite" not in printed_command(r.stdout)
    assert [p.name for p in run.iterdir()] == ["checkpoint.pt.tmp.4242"]


# a stand-in for the training process: saves nothing, exits with the given status once the job forwards SIGUSR1
STOPPED_CHILD = ("import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(int(sys.argv[1]))); "
                 "print('training', flush=True); time.sleep(60)")


@pytest.mark.parametrize("status,job_status", [
    (138, 75),  # 128 + SIGUSR1: the run saved and stopped (no SLURM here to requeue: "submit again", 75)
    (0, 75),    # what a torchrun launcher reports for the same stop
    (1, 1),     # a crash after the signal is a failure, passed on
    (143, 143), # 128 + SIGTERM, though the job forwarded SIGUSR1: not the stop it asked for
])
def test_the_job_tells_a_saved_stop_from_a_failure_by_the_exit_status(tmp_path, status, job_status):
    run = tmp_path / "base_checkpoints" / "d2"
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"step": 2, "num_iterations": 10}')
    (run / "checkpoint.pt").write_bytes(b"the checkpoint of step 2")
    script = (f'NANOCHAT_REPO={shlex.quote(ROOT)}; source "$NANOCHAT_REPO/slurm/common.sh"; PY={shlex.quote(sys.executable)}; '
              f'OUTPUT_DIR={shlex.quote(str(tmp_path))}; MODEL_TAG=d2; nanochat_launch "$PY" -c "$0" {status}')
    job = subprocess.Popen(["bash", "-c", script, STOPPED_CHILD], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=job_env(tmp_path, tmp_path))
    assert job.stdout.readline().startswith("+ ") and job.stdout.readline() == "training\n"
    job.send_signal(signal.SIGUSR1)
    out = job.communicate(timeout=60)[0]
    assert job.returncode == job_status, out
    assert f"job: training exited with status {status}" in out
    assert ("checkpoint saved (partial 2 10); submit the same job again" in out) == (job_status == 75)


@pytest.mark.parametrize("files,resume,expect", [
    (["train_metrics.jsonl"], "auto", "--overwrite=true"),  # killed before its first checkpoint: start again
    (["checkpoint.pt"], "auto", "--resume"),                # killed between checkpoint.pt and config.json
    (["checkpoint.pt", "config.json"], "0", "--overwrite=true"),  # starting over was asked for
])
def test_the_next_start_continues_or_replaces_what_a_killed_job_left(prepared_base, tmp_path, files, resume, expect):
    run = tmp_path / "phase1/base_checkpoints/d4"
    run.mkdir(parents=True)
    for name in files:
        (run / name).write_text('{"step": 1}\n')
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, "phase1_cpu.sbatch")], cwd=ROOT, capture_output=True, text=True,
                       env=job_env(prepared_base, tmp_path, NANOCHAT_DRY_RUN=1, NANOCHAT_RESUME=resume), timeout=60)
    assert r.returncode == 0, r.stderr
    assert expect in printed_command(r.stdout) and sorted(os.listdir(run)) == sorted(files)


@pytest.mark.slow  # runs the login-node script (setup, data, tokenizer); CI runs it
def test_login_node_preparation_offline(tmp_path):
    env = job_env(tmp_path / "base", tmp_path / "runs", SKIP_SETUP=1, DATA_SOURCE="offline", VOCAB_SIZE=300,
                  PREPARE_DATA_ARGS="--max_chars_per_domain=60000 --docs_per_shard=100")
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, "prepare_login_node.sh")], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "base/base_data/val_00000.parquet").exists() and (tmp_path / "base/tokenizer/tokenizer.json").exists()
    assert "=== ready" in r.stdout
    again = subprocess.run(["bash", os.path.join(SLURM_DIR, "prepare_login_node.sh")], cwd=str(tmp_path), env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already") == 4  # data, tokenizer and the two domains
    assert (tmp_path / "base/wiki/val_00000.parquet").exists() and (tmp_path / "base/shakespeare/val_00000.parquet").exists()


def test_a_failed_install_is_reported_not_raised(tmp_path, monkeypatch):
    """Without SLURM and without a working apt (no network), ensure_slurm says why; the fixture skips with that.
    The policy file that keeps package scripts from starting services goes to tmp_path, not /usr/sbin."""
    import tests.slurm_cluster as sc
    monkeypatch.setattr(sc, "POLICY_RC", str(tmp_path / "policy-rc.d"))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apt-get").write_text("#!/bin/sh\necho 'E: Could not resolve deb.debian.org' >&2\nexit 100\n")
    (fake / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setattr(sc, "which", lambda name: str(fake / name) if name == "apt-get" else None)
    if os.geteuid() != 0:
        assert "needs root" in sc.ensure_slurm()
        return
    reason = sc.ensure_slurm()
    assert reason.startswith("'apt-get update' failed (exit 100)") and "Could not resolve" in reason
    assert not os.path.exists(sc.POLICY_RC)  # made for the install and removed again


# -- under a real SLURM ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_slurm()
    if reason:
        print(f"\nSLURM tests skipped: {reason}", file=sys.__stderr__)
        pytest.skip(f"no SLURM: {reason}")
    cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


# the cluster facts of the job files, overridden for this machine by sbatch options
LOCAL = ["--partition=debug", "--gres=none", "--cpus-per-task=1", "--mem=1G", "--time=15"]
TINY = ["--max_seq_len=64", "--sample_every=-1"]


def submit(slurm, job, sbatch_opts, args, env, log_dir):
    os.makedirs(log_dir, exist_ok=True)  # SLURM cannot create the folder of --output
    return slurm.sbatch([*LOCAL, *sbatch_opts, f"--output={log_dir}/%x-%j.out", os.path.join("slurm", job), *args],
                        env=env, cwd=ROOT)


def log_of(log_dir, job):
    (path,) = glob.glob(os.path.join(str(log_dir), f"*-{job}.out"))
    return open(path).read()


def step_lines(log):
    """{step: 'loss: ... | grad norm: ... | lrm: ...'} of the console lines (timings left out)."""
    found = {}
    for m in re.finditer(r"^step (\d+)/\d+ \([\d.]+%\) \| (loss: \S+ \| grad norm: \S+ \| lrm: \S+)", log, re.M):
        found[int(m.group(1))] = m.group(2)
    return found


def release_requeued(slurm, job):
    """A requeued job may restart only once its old credential has expired (CRED_EXPIRE, set short
    in the test cluster); wait that out, then start it without SLURM's scheduling delay (the update
    fails harmlessly if it has already started)."""
    time.sleep(CRED_EXPIRE + 1)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm.env, timeout=60)


def assert_completed(slurm, job, log_dir, timeout=240):
    info = slurm.wait(job, timeout=timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log_of(log_dir, job)[-3000:]
    return info


@pytest.mark.slurm
def test_phase1_job_completes(slurm, prepared_base, tmp_path):
    env = job_env(prepared_base, tmp_path / "runs", DEPTH=2)
    job = submit(slurm, "phase1_cpu.sbatch", [], [*TINY, "--total_batch_size=64", "--num_iterations=20", "--svd_interval=5",
                                                  "--eval_tokens=64"], env, tmp_path)
    assert_completed(slurm, job, tmp_path)
    log = log_of(tmp_path, job)
    for s in (5, 10, 15, 20):
        assert f"=== SVD Analysis at step {s} ===" in log
    assert "[block0.attn.c_q] Initial SVD computed" in log and "Minimum validation bpb:" in log
    run = tmp_path / "runs/phase1/base_checkpoints/d2"
    assert (run / "checkpoint.pt").exists() and len(open(run / "svd_metrics.jsonl").readlines()) == 4
    # submitting the finished run again does nothing
    again = submit(slurm, "phase1_cpu.sbatch", [], [], env, tmp_path)
    assert_completed(slurm, again, tmp_path)
    assert "is complete; nothing to do" in log_of(tmp_path, again)


@pytest.mark.slurm
def test_signalled_job_saves_requeues_and_resumes_exactly(slurm, prepared_base, tmp_path):
    args = [*TINY, "--total_batch_size=64", "--num_iterations=300", "--svd_interval=25", "--eval_tokens=128",
            "--eval_every=-1", "--adaptive_svd_target_layer=-1", "--svd_targets=attn"]
    ref = submit(slurm, "phase1_cpu.sbatch", [], args, job_env(prepared_base, tmp_path / "ref", DEPTH=2), tmp_path / "ref")
    job = submit(slurm, "phase1_cpu.sbatch", [], args, job_env(prepared_base, tmp_path / "int", DEPTH=2), tmp_path / "int")
    deadline = time.time() + 180
    while not re.search(r"^step 0003\d/", _read(tmp_path / "int", job), re.M):
        assert time.time() < deadline, _read(tmp_path / "int", job)[-2000:]
        assert slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), _read(tmp_path / "int", job)[-2000:]
        time.sleep(0.2)
    slurm.signal(job, "USR1", batch=True)
    deadline = time.time() + 120
    while int(slurm.job(job).get("Restarts", 0)) < 1:  # the job requeued itself after the save
        assert time.time() < deadline and slurm.job(job)["JobState"] in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED"), slurm.job(job)
        time.sleep(0.5)
    release_requeued(slurm, job)
    info = assert_completed(slurm, job, tmp_path / "int")
    assert_completed(slurm, ref, tmp_path / "ref")
    assert info["Restarts"] == "1"
    log, ref_log = log_of(tmp_path / "int", job), log_of(tmp_path / "ref", ref)
    stop = re.search(r"Stopped by signal 10 at step (\d+); continue with --resume", log)
    assert stop and "job: got SIGUSR1" in log and f"requeueing job {job}" in log
    at = int(stop.group(1))
    assert 30 <= at < 300 and f"from its checkpoint at step {at} of 300 (--resume)" in log
    assert f"Resumed from {tmp_path}/int/phase1/base_checkpoints/d2 at step {at}" in log
    # the two halves together are the uninterrupted run, step by step, to the last printed digit
    assert step_lines(log) == step_lines(ref_log) and len(step_lines(ref_log)) == 300
    bpb = re.compile(r"Minimum validation bpb: \S+")
    assert bpb.findall(log)[-1] == bpb.findall(ref_log)[-1]
    a = torch.load(tmp_path / "int/phase1/base_checkpoints/d2/checkpoint.pt")
    b = torch.load(tmp_path / "ref/phase1/base_checkpoints/d2/checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    records = [[(r["step"], r["layer"], r["action"], r.get("r_after")) for r in map(json.loads, open(p))]
               for p in (tmp_path / "int/phase1/base_checkpoints/d2/svd_metrics.jsonl",
                         tmp_path / "ref/phase1/base_checkpoints/d2/svd_metrics.jsonl")]
    assert records[0] == records[1] and len(records[0]) == 12 * 8  # 12 analyses x 8 attention matrices


def _read(log_dir, job):
    paths = glob.glob(os.path.join(str(log_dir), f"*-{job}.out"))
    return open(paths[0]).read() if paths else ""


@pytest.mark.slurm
def test_two_task_and_two_process_jobs_run_the_gloo_path(slurm, prepared_base, tmp_path):
    args = [*TINY, "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=4", "--eval_tokens=256",
            "--svd_interval=2"]
    common = dict(DEPTH=2, DEVICE_TYPE="cpu", CORE_EVERY=-1)
    multi = submit(slurm, "phase3_multinode.sbatch", ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2"], args,
                   job_env(prepared_base, tmp_path / "runs", NPROC_PER_NODE=1, RDZV_PORT=free_port(), **common), tmp_path)
    single = submit(slurm, "phase3_adaptive.sbatch", ["--cpus-per-task=2"], args,
                    job_env(prepared_base, tmp_path / "runs", NPROC_PER_NODE=2, **common), tmp_path)
    for job, kind in ((multi, "phase3_multinode_adaptive"), (single, "phase3_adaptive")):
        assert_completed(slurm, job, tmp_path)
        log = log_of(tmp_path, job)
        assert "Distributed: 2 ranks, backend gloo" in log
        assert "analysis spread over 2 ranks by layer" in log and "=== SVD Analysis at step 4 ===" in log
        ckpt = torch.load(tmp_path / f"runs/{kind}/base_checkpoints/d2/checkpoint.pt")
        assert ckpt["metadata"]["world_size"] == 2
    assert "Rendezvous: 2 torchrun(s) x 1 process(es)" in log_of(tmp_path, multi)


@pytest.mark.slurm
def test_signalled_two_task_job_resumes_exactly(slurm, prepared_base, tmp_path):
    """The multi-node path under a signal: srun forwards SIGUSR1 to both tasks, both ranks save one
    checkpoint together, the job requeues itself, the two torchruns meet again and the run ends with
    the weights of an uninterrupted 2-rank job. Slow (about a minute): two 2-task jobs, one restarted."""
    args = [*TINY, "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=200", "--eval_tokens=256",
            "--eval_every=-1", "--svd_interval=25", "--svd_protect_frac=0.1", "--svd_alpha=0.6", "--svd_exit_p=0.7", "--svd_patience=1", "--save_every=-1"]
    opts = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2"]
    common = dict(DEPTH=2, DEVICE_TYPE="cpu", CORE_EVERY=-1, NPROC_PER_NODE=1)
    ref = submit(slurm, "phase3_multinode.sbatch", opts, args,
                 job_env(prepared_base, tmp_path / "ref", RDZV_PORT=free_port(), **common), tmp_path / "ref")
    job = submit(slurm, "phase3_multinode.sbatch", opts, args,
                 job_env(prepared_base, tmp_path / "int", RDZV_PORT=free_port(), **common), tmp_path / "int")
    deadline = time.time() + 240
    while not re.search(r"^step 0003\d/", _read(tmp_path / "int", job), re.M):
        assert time.time() < deadline and slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), \
            _read(tmp_path / "int", job)[-2000:]
        time.sleep(0.2)
    slurm.signal(job, "USR1", batch=True)
    deadline = time.time() + 120
    while int(slurm.job(job).get("Restarts", 0)) < 1:
        assert time.time() < deadline and slurm.job(job)["JobState"] in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED"), slurm.job(job)
        time.sleep(0.5)
    release_requeued(slurm, job)
    assert_completed(slurm, job, tmp_path / "int", timeout=300)
    assert_completed(slurm, ref, tmp_path / "ref", timeout=300)
    log, ref_log = log_of(tmp_path / "int", job), log_of(tmp_path / "ref", ref)
    assert re.search(r"Stopped by signal 10 at step \d+", log) and log.count("Distributed: 2 ranks, backend gloo") == 2
    assert step_lines(log) == step_lines(ref_log) and len(step_lines(ref_log)) == 200
    run = "phase3_multinode_adaptive/base_checkpoints/d2/checkpoint.pt"
    a, b = torch.load(tmp_path / "int" / run), torch.load(tmp_path / "ref" / run)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


@pytest.mark.slurm
def test_time_limit_warning_signal_saves_and_requeues(slurm, prepared_base, tmp_path):
    """SLURM's own warning before the limit: with --time=3 and the job file's --signal=B:USR1@N set to
    120 s, SLURM signals the batch shell about 60 s into the job (up to a minute earlier: its timer is
    coarse, so the run must have started and installed its handler well before); the run saves a
    checkpoint and the job requeues itself. Slow: waits for SLURM's clock, about a minute."""
    args = [*TINY, "--total_batch_size=64", "--num_iterations=100000", "--svd_interval=1000", "--eval_tokens=64",
            "--eval_every=-1", "--save_every=-1"]
    job = submit(slurm, "phase1_cpu.sbatch", ["--time=3", "--signal=B:USR1@120"], args,
                 job_env(prepared_base, tmp_path / "runs", DEPTH=2), tmp_path)
    deadline = time.time() + 240
    while int(slurm.job(job).get("Restarts", 0)) < 1:
        assert time.time() < deadline and slurm.job(job)["JobState"] in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED"), \
            (slurm.job(job), _read(tmp_path, job)[-2000:])
        time.sleep(1)
    log = _read(tmp_path, job)
    assert "job: got SIGUSR1" in log and re.search(r"Stopped by signal 10 at step \d+", log) and "requeueing job" in log
    subprocess.run(["scancel", job], env=slurm.env, timeout=60)  # the requeued run would go on for a long time
    ckpt = torch.load(tmp_path / "runs/phase1/base_checkpoints/d2/checkpoint.pt")
    assert 0 < ckpt["metadata"]["step"] < 100000
