"""One process owns a run folder; a resume states its terms; a stop's save survives a second signal.

- The lock: a second process (fresh, --resume, --overwrite) into a folder that a live process holds stops
  in one line naming the holder and changes no byte; a SIGKILLed holder leaves no stale lock.
- Resume: every flag has one resume term; a flag that must match and differs stops in one line; a flag that
  may change takes effect, is printed, and config.json and the checkpoint record what ran.
- Signals: a second signal during the stop's save prints one line and the save completes; the exit status
  of a run stopped by signal n is 128 + n.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from nanochat.adaptive_cycle import AdaptiveConfig
from nanochat.checkpoint_manager import CHECKPOINT_NAME, CONFIG_NAME, load_checkpoint
from nanochat.common import UserError, run_cli
from nanochat.jobs import Job, run_jobs
from nanochat.resume_terms import MAY_CHANGE, MUST_MATCH, TERMS
from nanochat.run_lock import LOCK_NAME, RunLock
from nanochat.run_files import RunFolder
from nanochat.hooks import TrainHook
from nanochat.train import TrainConfig, train
from tests.conftest import ROOT, StopAt

TINY = dict(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, eval_tokens=1024, sample_every=-1,
            eval_every=-1, device_type="cpu", dtype="float32")


@pytest.fixture
def base(prepared_base, monkeypatch, one_thread):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return prepared_base


def run_dir(out, tag="d2"):
    return os.path.join(out, "base_checkpoints", tag)


def files(path):
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


# -------------------------------------------------------------------- the lock

HOLD = ("import sys, time\nfrom nanochat.run_lock import RunLock\nRunLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\ntime.sleep(600)\n")


def hold(folder):
    """Another process that holds the folder's lock (as a training process does) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, folder], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_a_second_process_into_a_held_folder_stops_in_one_line_and_changes_nothing(base, tmp_path):
    train(TrainConfig(**TINY, num_iterations=2, output_dir=str(tmp_path)))
    run = run_dir(tmp_path)
    holder = hold(run)
    try:
        before = files(run)
        held = json.loads(before[LOCK_NAME])
        assert held["pid"] == holder.pid and held["host"] == socket.gethostname()
        for how in (dict(resume=True), dict(overwrite=True), dict()):
            with pytest.raises(UserError) as e:
                train(TrainConfig(**TINY, num_iterations=4, output_dir=str(tmp_path), **how))
            message = str(e.value)
            assert message.startswith(f"{run} is in use by a training process (pid {holder.pid} on host "
                                      f"{socket.gethostname()}, started {held['started']}; lock {run}/{LOCK_NAME}); "
                                      f"nothing was changed"), message
            assert "\n" not in message
            assert files(run) == before  # --overwrite removed nothing, --resume trimmed nothing
        # an experiment runner (scripts.compare_runs, scripts.forgetting) refuses before writing its command or log
        job = Job("d2", run, [f"--{k}={v}" for k, v in TINY.items()], complete=lambda d: False)
        with pytest.raises(UserError, match=rf"in use by a training process \(pid {holder.pid} on host"):
            run_jobs([job], slots=1)
        assert files(run) == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    result = train(TrainConfig(**TINY, num_iterations=4, output_dir=str(tmp_path), resume=True))
    assert result["step"] == 4
    assert open(os.path.join(run, LOCK_NAME), "rb").read() == b""  # given back, and emptied, at the end


def test_the_lock_is_one_per_folder_per_process_and_not_a_run_file(tmp_path):
    folder = str(tmp_path)
    a, b = RunLock(folder), RunLock(folder)
    a.acquire()
    with pytest.raises(UserError, match=rf"in use by a training process \(this process \(pid {os.getpid()}\)"):
        b.acquire()  # POSIX locks belong to the process: a second one would silently succeed, then drop both on close
    assert RunFolder(folder).run_files() == []  # the lock file does not make the folder hold a run
    a.release()
    b.acquire()
    b.release()


def test_a_fresh_run_locks_the_folder_it_creates_and_checks_it_again(base, tmp_path, monkeypatch):
    """The folder does not exist at the start of the run: it is locked once created, and the fresh-run check is
    repeated under the lock (another run may have appeared meanwhile)."""
    appeared = {}

    def another_run_appears(folder):
        os.makedirs(folder.path, exist_ok=True)
        open(os.path.join(folder.path, CONFIG_NAME), "w").write('{"step": 3, "num_iterations": 9}')
        appeared["yes"] = True

    start = RunFolder.start

    def start_after_another(self, *args, **kwargs):
        another_run_appears(self)
        return start(self, *args, **kwargs)

    monkeypatch.setattr(RunFolder, "start", start_after_another)
    with pytest.raises(UserError, match="already holds files of a run that has no checkpoint"):
        train(TrainConfig(**TINY, num_iterations=2, output_dir=str(tmp_path)))
    assert appeared and sorted(os.listdir(run_dir(tmp_path))) == [LOCK_NAME, CONFIG_NAME]


@pytest.mark.slow
def test_a_live_training_process_holds_its_folder_until_killed(base, tmp_path):
    """The same against a real training process, frozen (SIGSTOP) while the others try, then SIGKILLed."""
    args = [f"--{k}={v}" for k, v in TINY.items()] + ["--save_every=2", f"--output_dir={tmp_path}", "--model_tag=d2"]
    log = open(tmp_path / "holder.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args, "--num_iterations=400"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    run = run_dir(tmp_path)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(run, CONFIG_NAME)):
            assert proc.poll() is None and time.time() < deadline, open(tmp_path / "holder.log").read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)
        before = files(run)
        for extra in (["--resume"], ["--overwrite=true"], []):
            extra.append("--num_iterations=400")
            r = subprocess.run([sys.executable, "-m", "scripts.base_train", *args, *extra], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert f"is in use by a training process (pid {proc.pid} on host {socket.gethostname()}" in r.stderr
            assert files(run) == before
    finally:
        proc.kill()
        proc.wait()
    saved = json.load(open(os.path.join(run, CONFIG_NAME)))["step"]  # the holder's last save
    r = subprocess.run([sys.executable, "-m", "scripts.base_train", *args, "--resume", f"--num_iterations={saved + 2}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(os.path.join(run, CHECKPOINT_NAME))["loop"]["step"] == saved + 2


# -------------------------------------------------------------------- resume terms

def test_every_flag_has_one_resume_term():
    flags = {f.name for f in dataclasses.fields(AdaptiveConfig)}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags
    assert set(TERMS) == flags  # every flag classified, and no term for a flag that does not exist
    assert {TERMS[k] for k in ("matrix_lr", "embedding_lr", "unembedding_lr", "weight_decay", "depth", "seed")} == {MUST_MATCH}
    assert {TERMS[k] for k in ("num_iterations", "eval_every", "save_every", "sample_every")} == {MAY_CHANGE}


def test_resume_refuses_a_changed_learning_rate_and_records_what_ran(base, tmp_path, capsys):
    train(TrainConfig(**TINY, num_iterations=4, output_dir=str(tmp_path)), hook=StopAt(2))
    run = run_dir(tmp_path)
    before = files(run)
    for flags, match in ((dict(matrix_lr=0.05), r"--matrix_lr=0\.02, not 0\.05 \(the learning rates and weight decay are "
                                                r"part of the checkpoint's optimizer state\); a resumed run continues"),
                         (dict(matrix_lr=0.03, grad_clip=2.0), r"--matrix_lr=0\.02, not 0\.03 and --grad_clip=1\.0, "
                                                               r"not 2\.0"),
                         (dict(num_iterations=1), r"the checkpoint is at step 2, after the end of a 1-step run")):
        with pytest.raises(UserError, match=match) as e:
            train(TrainConfig(**{**TINY, "num_iterations": 4, **flags}, output_dir=str(tmp_path), resume=True))
        assert "\n" not in str(e.value)
        assert files(run) == before
    capsys.readouterr()
    train(TrainConfig(**{**TINY, "eval_every": 3, "save_every": 5}, num_iterations=6, output_dir=str(tmp_path), resume=True))
    out = capsys.readouterr().out
    assert ("Resume at step 2: from the checkpoint: weights, optimizer state (matrix_lr=0.02, embedding_lr=0.2, "
            "unembedding_lr=0.004, weight_decay=0.0, Muon momentum, AdamW moments), LR-schedule position, data position, "
            "RNG state;") in out
    assert ("Resume: from the command line, in effect from here: --num_iterations=6 (was 4); --eval_every=3 (was -1); "
            "--save_every=5 (was -1); the horizon is 6 steps (was 4): the LR schedule changes from here") in out
    assert "Step 00003 | Validation bpb" in out and "(step 5)" in out  # the new cadence took effect
    ckpt = load_checkpoint(os.path.join(run, CHECKPOINT_NAME))
    config = json.load(open(os.path.join(run, CONFIG_NAME)))
    for recorded in (config["train_config"], ckpt["metadata"]["train_config"]):
        assert recorded["eval_every"] == 3 and recorded["save_every"] == 5 and recorded["matrix_lr"] == 0.02
    # what the optimizer ran with is what is recorded
    assert ckpt["optim"]["muon"]["group"]["initial_lr"] == config["train_config"]["matrix_lr"]
    assert config["num_iterations"] == 6
    # and from which step the new values hold
    changed = {"num_iterations": [4, 6], "eval_every": [-1, 3], "save_every": [-1, 5], "horizon": [4, 6]}
    assert config["resumes"] == ckpt["metadata"]["resumes"] == [{"step": 2, "changed": changed}]


# -------------------------------------------------------------------- a second signal during the stop's save

def test_a_second_ctrl_c_during_the_save_waits_for_it_and_the_run_exits_130(base, tmp_path, monkeypatch, capfd):
    """Ctrl-C at step 3, Ctrl-C again while torch.save writes the stop's checkpoint: one line, a valid
    checkpoint of step 3, exit status 130 (the entry point through run_cli, in this process)."""
    from scripts.base_train import main

    monkeypatch.setattr(TrainHook, "after_backward",
                        lambda self, step, last: os.kill(os.getpid(), signal.SIGINT) if step == 3 else None)
    save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # in the middle of the atomic write: before its fsync and rename

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(SystemExit) as e:
        run_cli(main, [*[f"--{k}={v}" for k, v in TINY.items()], "--num_iterations=8", f"--output_dir={tmp_path}",
                       "--model_tag=d2"])
    out, err = capfd.readouterr()
    assert e.value.code == 130, err
    assert err.strip().splitlines() == ["Signal 2 during the checkpoint save: the save finishes first, then the run stops"]
    assert "Stopped by signal 2 at step 3; continue with --resume" in out
    assert load_checkpoint(os.path.join(run_dir(tmp_path), CHECKPOINT_NAME))["loop"]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_under_torchrun_a_second_signal_during_the_save_waits_for_it(base, tmp_path):
    """2 gloo ranks: SIGTERM to rank 1 stops both; SIGINT to both while rank 0 writes the checkpoint (slowed by
    3 s) is one line, the save completes, and torchrun ends with 0 (its workers exit 0 after a stop)."""
    from tests.test_run_safety import torchrun, wait_for

    log_path = tmp_path / "run.log"
    proc = torchrun(base, tmp_path, ["--eval_every=-1", "--num_iterations=50"], log_path, DIST_RUN_SLOW_SAVE="3")
    text = lambda: open(log_path).read()  # noqa: E731
    wait_for(lambda: "step 00002/00050" in text(), proc, timeout=300, what="step 2")
    os.kill(int(open(tmp_path / "pid1").read()), signal.SIGTERM)
    wait_for(lambda: "DIST_RUN: saving" in text(), proc, timeout=60, what="the stop's save")
    for rank in (0, 1):
        os.kill(int(open(tmp_path / f"pid{rank}").read()), signal.SIGINT)
    proc.wait(timeout=60)
    out = text()
    assert proc.returncode == 0 and out.count("Signal 2 during the checkpoint save: the save finishes first") == 1, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    stopped = int(out.split("Stopped by signal 15 at step ")[1].split(";")[0])
    assert load_checkpoint(os.path.join(run_dir(tmp_path), CHECKPOINT_NAME))["loop"]["step"] == stopped


@pytest.mark.slow
def test_under_torchrun_rank_0_alone_takes_the_lock_and_a_held_folder_stops_every_rank(base, tmp_path):
    """A 2-rank run takes the lock on rank 0 only (rank 1 locking too would refuse its own run); into a folder
    another process holds, rank 0 stops in one line and torchrun ends every rank, no rank waits forever."""
    from tests.test_run_safety import finished, torchrun

    finished(torchrun(base, tmp_path, ["--eval_every=-1"], tmp_path / "first.log"), tmp_path / "first.log")
    holder = hold(run_dir(tmp_path))
    try:
        before = files(run_dir(tmp_path))
        proc = torchrun(base, tmp_path, ["--eval_every=-1", "--num_iterations=8", "--resume"], tmp_path / "second.log")
        proc.wait(timeout=120)
        out = open(tmp_path / "second.log").read()
        assert proc.returncode != 0 and out.count(f"is in use by a training process (pid {holder.pid}") == 1, out[-3000:]
        assert files(run_dir(tmp_path)) == before
    finally:
        holder.kill()
        holder.wait()
