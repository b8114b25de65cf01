"""Runs never lose or corrupt history: real processes, real signals, real files.

A fresh run refuses a folder that holds a run; SIGKILL at any moment leaves a folder that --resume turns
into exactly what an uninterrupted run leaves; damaged checkpoints and failed writes give one line and
touch nothing; SIGTERM/SIGINT stop within a micro-batch, an evaluation batch or an analysed layer.
The reference for "exact" is always an uninterrupted run with the same flags: same per-step rows in
train_metrics.jsonl (timing fields aside), same svd_metrics.jsonl rows, same final weights.
"""

import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from nanochat import stopping
from nanochat.adaptive_cycle import AdaptiveConfig, AdaptiveSVDHook
from nanochat.checkpoint_manager import CHECKPOINT_NAME, CONFIG_NAME, config_text, load_checkpoint, write_checkpoint
from nanochat.common import UserError
from nanochat.core_eval import evaluate_core
from nanochat.jobs import with_defaults
from nanochat.run_files import TEMP_RE, JsonlLog
from nanochat.runs import read_jsonl, svd_summary
from nanochat.stopping import StopSignals, StopTraining
from nanochat.hooks import TrainHook
from nanochat.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "dist_run.py")
TINY = dict(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, eval_tokens=1024, sample_every=-1,
            device_type="cpu", dtype="float32")  # runs compared here must not each time bf16 against fp32 (--dtype=auto) on their own
ADAPTIVE = dict(svd_interval=2, adaptive_svd_target_layer=-1, svd_targets="attn")
TIMING = ("dt", "tok_per_sec", "total_time")  # they (and every *_seconds field) measure the machine, not the run


@pytest.fixture
def base(prepared_base, monkeypatch):
    """Data and tokenizer; one intra-op thread here and in subprocesses, so that their numbers match bit for bit."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield prepared_base
    torch.set_num_threads(threads)


def env(base):
    return dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def flags(cfg):
    return [f"--{k}={v}" for k, v in cfg.items()]


def folder(out, tag="d2"):
    return os.path.join(out, "base_checkpoints", tag)


def adaptive(out, **kw):
    cfg = AdaptiveConfig(**TINY, **ADAPTIVE, output_dir=str(out), **kw)
    return train(cfg, hook=AdaptiveSVDHook(cfg))


def baseline(out, hook=None, **kw):
    return train(TrainConfig(**TINY, output_dir=str(out), **kw), hook=hook)


def files(path):
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def rows(path):
    """The rows of a metrics file, timing fields left out; read_jsonl refuses duplicate rows."""
    return [{k: v for k, v in r.items() if k not in TIMING and not k.endswith("_seconds")} for r in read_jsonl(path)]


def weights(path):
    return torch.load(os.path.join(path, CHECKPOINT_NAME))["model"]


def assert_like_uninterrupted(run, ref):
    """The folder of an interrupted-and-resumed run holds what the uninterrupted run's folder holds."""
    assert not [n for n in os.listdir(run) if TEMP_RE.match(n)]
    assert sorted(os.listdir(run)) == sorted(os.listdir(ref))
    for name in os.listdir(ref):
        if name.endswith(".jsonl"):
            got, want = rows(os.path.join(run, name)), rows(os.path.join(ref, name))
            for a, b in zip(got, want):
                assert a == b, (name, {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)})
            assert len(got) == len(want), name
    ckpt = load_checkpoint(os.path.join(run, CHECKPOINT_NAME))
    assert open(os.path.join(run, CONFIG_NAME), "rb").read() == config_text(ckpt["config"])
    config, ref_config = (json.load(open(os.path.join(d, CONFIG_NAME))) for d in (run, ref))
    for key in ("step", "val_bpb", "min_val_bpb", "hook"):
        assert config[key] == ref_config[key], key
    a, b = weights(run), weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in b)


class SignalAt(TrainHook):
    """Sends `signum` to this process during update `at` (count times)."""

    def __init__(self, at, signum=signal.SIGUSR1, count=1):
        self.at, self.signum, self.count = at, signum, count

    def after_backward(self, step, last_step):
        if step == self.at:
            for _ in range(self.count):
                os.kill(os.getpid(), self.signum)


def wait_for(predicate, proc, timeout=120, what="the condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before {what}")
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def launch(module, args, base, log_path, **extra_env):
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, *(["-m", module] if module else []), *args], cwd=ROOT,
                            env=dict(env(base), **extra_env), stdout=log, stderr=subprocess.STDOUT)


def text(path):
    return open(path).read()


# -------------------------------------------------------------------- fresh runs never clobber a run

def test_fresh_run_into_a_run_folder_is_refused_and_changes_nothing(base, tmp_path):
    adaptive(tmp_path, num_iterations=4, eval_every=2)
    run = folder(tmp_path)
    open(os.path.join(run, "checkpoint.pt.tmp.99999"), "wb").write(b"debris of a killed save")
    before = files(run)
    assert {"checkpoint.pt", "config.json", "svd_metrics.jsonl", "train_metrics.jsonl"} <= set(before)

    with pytest.raises(UserError, match=r"already holds a run \(checkpoint at step 4 of 4\); continue it with --resume, "
                                        r"or replace it with --overwrite=true"):
        adaptive(tmp_path, num_iterations=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    for how in (dict(resume=True), dict(overwrite=True)):  # nor does a resume or a replacement that fails a check
        with pytest.raises(UserError, match="no train shards"):
            adaptive(tmp_path, num_iterations=8, data_dir=str(empty), **how)
    mismatch = AdaptiveConfig(**dict(TINY, max_seq_len=32), **ADAPTIVE, output_dir=str(tmp_path), num_iterations=8, resume=True)
    with pytest.raises(UserError, match="--max_seq_len=64, not 32"):
        train(mismatch, hook=AdaptiveSVDHook(mismatch))
    with pytest.raises(UserError, match="give one of them"):
        adaptive(tmp_path, num_iterations=4, resume=True, overwrite=True)
    r = subprocess.run([sys.executable, "-m", "scripts.base_train_adaptive_svd", *flags(TINY), *flags(ADAPTIVE),
                        "--num_iterations=4", f"--output_dir={tmp_path}"], cwd=ROOT, env=env(base),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--resume" in r.stderr and "--overwrite=true" in r.stderr
    assert files(run) == before

    # --overwrite=true replaces the run: its checkpoint, config and metrics, and the debris
    adaptive(tmp_path, num_iterations=2, eval_every=2, overwrite=True)
    assert not os.path.exists(os.path.join(run, "checkpoint.pt.tmp.99999"))
    assert load_checkpoint(os.path.join(run, CHECKPOINT_NAME))["loop"]["step"] == 2
    assert [r["step"] for r in rows(os.path.join(run, "train_metrics.jsonl"))] == [0, 1, 2]
    assert sorted({r["step"] for r in rows(os.path.join(run, "svd_metrics.jsonl"))}) == [2]


# -------------------------------------------------------------------- damaged checkpoints

def flipped(data, start, length=4096):
    return data[:start] + bytes(b ^ 0xFF for b in data[start:start + length]) + data[start + length:]


def test_damaged_checkpoints_are_refused_with_the_file_untouched(base, tmp_path, capsys):
    baseline(tmp_path, num_iterations=2)
    run = folder(tmp_path, "d2")
    path = os.path.join(run, CHECKPOINT_NAME)
    good = open(path, "rb").read()
    # the guide's way to read it still works: a plain dict for torch.load(weights_only=True)
    plain = torch.load(path, map_location="cpu")
    assert plain["checksum"].startswith("sha256:") and "n_layer" in plain["metadata"]["model_config"]
    largest = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size)

    def refused(data, match):
        open(path, "wb").write(data)
        with pytest.raises(UserError, match=match) as e:
            load_checkpoint(path)
        assert open(path, "rb").read() == data and len(str(e.value).splitlines()) == 1
        return str(e.value)

    # 4 KB inverted inside a tensor: torch.load reads it without complaint, the checksum does not match
    inside = largest.header_offset + largest.file_size // 2
    refused(flipped(good, inside), "is corrupt: its content does not match the checksum stored in it")
    refused(flipped(good, len(good) // 2), "is corrupt")  # the middle of the file, wherever that falls
    msg = refused(good[:len(good) // 2], r"is corrupt or truncated \(PytorchStreamReader failed reading zip archive: "
                                         r"failed finding central directory\); restore a good copy or retrain$")
    assert "miniz" not in msg
    msg = refused(os.urandom(len(good) // 100), "is corrupt: it is not a PyTorch checkpoint")
    assert "weights_only" not in msg
    # non-finite values written with a valid checksum (what a diverged run would save)
    for key, where in ((("optim", "adamw", "state", 0, "exp_avg_sq"), "optimizer state adamw.state.0.exp_avg_sq"),
                       (("model", "transformer.wte.weight"), "model weight transformer.wte.weight")):
        ckpt = torch.load(io.BytesIO(good))
        leaf = ckpt
        for k in key[:-1]:
            leaf = leaf[k]
        leaf[key[-1]][0, 0] = float("nan")
        write_checkpoint(path, ckpt)
        refused(open(path, "rb").read(), rf"holds non-finite values in {where} \(1 of [0-9,]+ are NaN or inf\)")
    # a checkpoint from before checksums: loads with a note, and resumes
    ckpt = torch.load(io.BytesIO(good))
    del ckpt["checksum"]
    torch.save(ckpt, path)
    capsys.readouterr()
    result = baseline(tmp_path, num_iterations=4, resume=True, model_tag="d2")
    assert "has no checksum (written before checksums were added); loading it unverified" in capsys.readouterr().out
    assert result["step"] == 4


# -------------------------------------------------------------------- SIGKILL at any moment

KILL_RUN = dict(num_iterations=6, save_every=2, eval_every=4)


def kill_and_resume(base, out, ref, log_path, kill_when, capsys, how=KILL_RUN):
    """Start the adaptive script, SIGKILL it once kill_when(run folder) holds, resume it in-process, compare."""
    run = folder(out)
    proc = launch("scripts.base_train_adaptive_svd", [*flags(TINY), *flags(ADAPTIVE), *flags(how), f"--output_dir={out}"],
                  base, log_path)
    try:
        wait_for(lambda: kill_when(run), proc, what="the moment to kill")
        proc.kill()
    finally:
        proc.wait()
    debris = [n for n in os.listdir(run) if TEMP_RE.match(n)] if os.path.isdir(run) else []
    capsys.readouterr()
    if os.path.exists(os.path.join(run, CHECKPOINT_NAME)):
        adaptive(out, **how, resume=True)
    else:  # killed before its first save: only a new start can continue
        adaptive(out, **how, overwrite=True)
    out_text = capsys.readouterr().out
    if debris:
        assert f"Removed {len(debris)} file(s) left by an interrupted write in {run}: {debris[0]}" in out_text
    assert_like_uninterrupted(run, ref)
    return debris, out_text


@pytest.mark.slow  # in CI's slow pass: keeps the default suite under 2 minutes
def test_sigkill_in_a_save_then_resume_leaves_what_an_uninterrupted_run_leaves(base, tmp_path, capsys):
    adaptive(tmp_path / "ref", **KILL_RUN)
    ref = folder(tmp_path / "ref")

    def in_second_save(run):  # the checkpoint of step 2 exists and the next one is being written
        names = os.listdir(run) if os.path.isdir(run) else []
        return CHECKPOINT_NAME in names and any(n.startswith(CHECKPOINT_NAME + ".tmp.") for n in names)

    debris, out = kill_and_resume(base, tmp_path / "run", ref, tmp_path / "run.log", in_second_save, capsys)
    assert debris, "the kill was meant to land inside a save"
    assert "row(s) after step 2 (logged after the checkpoint; training repeats them)" in out


@pytest.mark.slow
def test_sigkill_at_random_moments(base, tmp_path, capsys):
    how = dict(num_iterations=16, save_every=2, eval_every=4)  # about 2 s of training here
    adaptive(tmp_path / "ref", **how)
    ref = folder(tmp_path / "ref")
    rng = random.Random(10)
    debris = 0
    for i in range(10):
        started = []

        def after_random_delay(run, delay=rng.uniform(0.0, 1.0)):
            if not started and os.path.exists(os.path.join(run, "train_metrics.jsonl")):
                started.append(time.time())  # training has started (files are opened then)
            return bool(started) and time.time() - started[0] >= delay

        debris += bool(kill_and_resume(base, tmp_path / f"run{i}", ref, tmp_path / f"run{i}.log", after_random_delay,
                                       capsys, how)[0])
    print(f"{debris} of 10 kills landed inside a save")


def test_config_json_a_crash_left_behind_is_rewritten_from_the_checkpoint(base, tmp_path, capsys):
    baseline(tmp_path, num_iterations=4, save_every=2)
    run = folder(tmp_path)
    path = os.path.join(run, CONFIG_NAME)
    final = open(path, "rb").read()
    behind = json.loads(final)
    behind["step"] = 2  # what a SIGKILL between writing checkpoint.pt and config.json leaves
    for damage in (lambda: open(path, "w").write(json.dumps(behind)), lambda: os.remove(path)):
        damage()
        capsys.readouterr()
        baseline(tmp_path, num_iterations=4, resume=True)  # the run is complete: nothing to train, nothing saved
        assert f"Rewrote {path} from the checkpoint" in capsys.readouterr().out
        assert open(path, "rb").read() == final


def test_metrics_rows_are_unique_after_a_trim_and_readers_refuse_duplicates(tmp_path, capsys):
    path = tmp_path / "svd_metrics.jsonl"
    lines = [{"step": s, "layer": layer} for s in (2, 4, 6) for layer in ("a", "b")]
    body = "".join(json.dumps(r) + "\n" for r in lines[:4] + [lines[2]] + lines[4:])
    path.write_text(body + '{"step": 8, "lay')  # a duplicate, rows after step 4, a torn last line
    with pytest.raises(UserError, match=r"holds two rows for step 4, layer a \(rows 3 and 5\)"):
        read_jsonl(str(path))
    with pytest.raises(UserError, match="two rows for step 4, layer a"):
        svd_summary([json.loads(line) for line in body.splitlines()])
    report = JsonlLog(str(path)).trim(4)
    assert report == ("svd_metrics.jsonl: dropped 2 row(s) after step 4 (logged after the checkpoint; training repeats "
                      "them), 1 duplicate row(s), 1 torn or unreadable line(s)")
    assert read_jsonl(str(path)) == lines[:4]
    assert JsonlLog(str(path)).trim(4) is None  # nothing to drop: the file is left as it is


# -------------------------------------------------------------------- failed writes

@pytest.mark.slow  # in CI's slow pass: keeps the default suite under 2 minutes
def test_disk_full_via_file_size_limit_is_one_line_and_resume_stays_exact(base, tmp_path):
    how = dict(num_iterations=6, save_every=2, eval_every=2)
    baseline(tmp_path / "ref", **how)
    first = baseline(tmp_path / "run", hook=SignalAt(2), **how)
    assert first["step"] == 2
    run = folder(tmp_path / "run")
    saved = files(run)
    limit = len(saved[CHECKPOINT_NAME]) // 2  # the metrics rows fit, the next checkpoint does not
    r = subprocess.run([sys.executable, "-m", "scripts.base_train", *flags(TINY), *flags(how), "--resume",
                        f"--output_dir={tmp_path / 'run'}", "--model_tag=d2"], cwd=ROOT, env=env(base),
                       capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.strip() == (f"error: could not write {run}/{CHECKPOINT_NAME} (File too large); the last good "
                                f"checkpoint, at step 2, is intact (continue with --resume)")
    after = files(run)
    assert after[CHECKPOINT_NAME] == saved[CHECKPOINT_NAME] and after[CONFIG_NAME] == saved[CONFIG_NAME]
    assert not [n for n in after if TEMP_RE.match(n)]
    baseline(tmp_path / "run", resume=True, **how)
    assert_like_uninterrupted(run, folder(tmp_path / "ref"))


def _tmpfs_available(path):
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {path}"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare (util-linux) to mount a private tmpfs")
def test_disk_full_on_a_small_tmpfs_says_no_space_left(base, tmp_path):
    how = dict(num_iterations=6, save_every=2, eval_every=2)
    baseline(tmp_path / "ref", **how)
    ref = folder(tmp_path / "ref")
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _tmpfs_available(disk):
        pytest.skip("this machine does not allow a tmpfs in a private user+mount namespace")
    # room for one checkpoint and its metrics, not for the temp file of the second save
    size = int(os.path.getsize(os.path.join(ref, CHECKPOINT_NAME)) * 1.5)
    copy = tmp_path / "copy"
    train_cmd = " ".join([sys.executable, "-m", "scripts.base_train", *flags(TINY), *flags(how), f"--output_dir={disk}",
                          "--model_tag=d2"])
    script = (f"mount -t tmpfs -o size={size} tmpfs {disk} && {{ {train_cmd}; rc=$?; cp -a {disk} {copy}; exit $rc; }}")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT, env=env(base),
                       capture_output=True, text=True, timeout=300)
    run = folder(copy)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.strip() == (f"error: could not write {folder(disk)}/{CHECKPOINT_NAME} (No space left on device); the "
                                f"last good checkpoint, at step 2, is intact (continue with --resume)")
    assert load_checkpoint(os.path.join(run, CHECKPOINT_NAME))["loop"]["step"] == 2
    assert not [n for n in os.listdir(run) if TEMP_RE.match(n)]
    baseline(copy, resume=True, model_tag="d2", **how)
    assert_like_uninterrupted(run, ref)


# -------------------------------------------------------------------- prompt stops

STOP_BOUND_S = 10  # from the signal to the end of the process, save included, at d2


def stop_process(proc, signum, log_path):
    t0 = time.time()
    proc.send_signal(signum)
    try:
        proc.wait(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running {STOP_BOUND_S} s after the signal:\n{text(log_path)[-2000:]}")
    return time.time() - t0


@pytest.mark.slow  # in CI's slow pass: keeps the default suite under 2 minutes
def test_sigterm_during_a_long_validation_stops_within_the_bound_and_resume_is_exact(base, tmp_path):
    how = dict(num_iterations=6, eval_every=3)
    baseline(tmp_path / "ref", **how)
    baseline(tmp_path / "run", hook=SignalAt(2), **how)  # a checkpoint at step 2
    run, log_path = folder(tmp_path / "run"), tmp_path / "run.log"
    # resumed with a validation that would take minutes: SIGTERM once it has begun at step 3
    proc = launch("scripts.base_train", [*flags(dict(TINY, eval_tokens=20_000_000)), *flags(how), "--resume",
                                         f"--output_dir={tmp_path / 'run'}", "--model_tag=d2"], base, log_path)
    wait_for(lambda: "step 00003/00006" in text(log_path), proc, what="step 3")
    time.sleep(0.5)
    stop_process(proc, signal.SIGTERM, log_path)
    out = text(log_path)
    assert proc.returncode == 128 + signal.SIGTERM and "Stopped by signal 15 at step 3; continue with --resume" in out, out[-2000:]
    assert "Step 00003 | Validation bpb" not in out  # abandoned, not finished
    assert load_checkpoint(os.path.join(run, CHECKPOINT_NAME))["loop"]["step"] == 3
    assert [r["step"] for r in rows(os.path.join(run, "train_metrics.jsonl"))] == [0, 1, 2]  # step 3 waits for its validation
    baseline(tmp_path / "run", resume=True, **how)
    assert_like_uninterrupted(run, folder(tmp_path / "ref"))


class SignalInAnalysis(AdaptiveSVDHook):
    """Sends SIGTERM from inside the first SVD kernel of the analysis at step `at`, and counts the SVD kernels
    after it."""
    at = 4

    def attach(self, run):
        super().attach(run)
        self.armed, self.sent, self.after = False, False, 0

    def after_backward(self, step, last_step):
        self.armed = step == self.at
        super().after_backward(step, last_step)

    def svd(self, *args, **kwargs):
        self.after += self.sent
        if self.armed and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return self.engine(*args, **kwargs)


def test_sigterm_during_an_analysis_abandons_it_without_a_trace(base, tmp_path, monkeypatch):
    how = dict(num_iterations=6, eval_every=-1)
    adaptive(tmp_path / "ref", **how)
    cfg = AdaptiveConfig(**TINY, **ADAPTIVE, output_dir=str(tmp_path / "run"), **how)
    hook = SignalInAnalysis(cfg)
    hook.engine = torch.linalg.svd
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "svd", hook.svd)
        first = train(cfg, hook=hook)
    assert first["stopped_by_signal"] == signal.SIGTERM and first["step"] == 3
    assert hook.sent and hook.after <= 1, "the analysis went on after the signal"  # at most the rest of that layer (group, batched)
    run = folder(tmp_path / "run")
    assert {r["step"] for r in rows(os.path.join(run, "svd_metrics.jsonl"))} == {2}  # nothing of step 4 logged
    assert load_checkpoint(os.path.join(run, CHECKPOINT_NAME))["loop"]["step"] == 3
    adaptive(tmp_path / "run", resume=True, **how)
    assert_like_uninterrupted(run, folder(tmp_path / "ref"))


@pytest.mark.slow
def test_sigterm_during_a_slow_analysis_stops_the_process_within_the_bound(base, tmp_path):
    # every SVD takes 2 s longer (tests/dist_run.py), so the analysis of 12 matrices would take > 24 s
    log_path = tmp_path / "run.log"
    proc = launch(None, [RUNNER, *flags(TINY), "--num_iterations=4", "--eval_every=-1", "--svd_interval=2",
                         "--adaptive_svd_target_layer=-1", "--svd_targets=all", f"--output_dir={tmp_path}"], base, log_path,
                  DIST_RUN_SLOW_SVD="2", DIST_RUN_OUT=str(tmp_path))
    wait_for(lambda: "=== SVD Analysis at step 2 ===" in text(log_path), proc, what="the analysis")
    took = stop_process(proc, signal.SIGTERM, log_path)
    out = text(log_path)
    assert proc.returncode == 143 and "Stopped by signal 15 at step 1; continue with --resume" in out, out[-2000:]
    assert took < 2 + STOP_BOUND_S / 2 and "=== SVD Analysis complete ===" not in out
    assert not read_jsonl(os.path.join(folder(tmp_path), "svd_metrics.jsonl"))


def test_sigterm_during_core_evaluation_abandons_it_after_the_current_example(tmp_path):
    from tests.test_core_eval import AlphabetOracle, CharTokenizer, tiny_tasks

    class SignalOnSecondExample(AlphabetOracle):
        def forward(self, *args, **kwargs):
            if self.calls == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().forward(*args, **kwargs)

    model, stop = SignalOnSecondExample(), StopSignals()
    stop.install()
    try:
        with pytest.raises(StopTraining):
            evaluate_core(model, CharTokenizer(), torch.device("cpu"), tasks=tiny_tasks(tmp_path), log=None, stop=stop)
    finally:
        stop.restore()
    assert model.calls == 2 and stop.agreed == signal.SIGTERM  # one forward per example: none after the signal


def test_sigint_saves_and_a_second_one_stops_at_once_without_saving(base, tmp_path, monkeypatch):
    first = baseline(tmp_path / "a", hook=SignalAt(3, signal.SIGINT), num_iterations=6)
    assert first["stopped_by_signal"] == signal.SIGINT and first["step"] == 3
    assert load_checkpoint(os.path.join(folder(tmp_path / "a"), CHECKPOINT_NAME))["loop"]["step"] == 3
    # two at once are one Ctrl-C delivered twice (torchrun passes the terminal's on): a normal stop
    again = baseline(tmp_path / "c", hook=SignalAt(3, signal.SIGINT, count=2), num_iterations=6)
    assert again["stopped_by_signal"] == signal.SIGINT and again["step"] == 3
    monkeypatch.setattr(stopping, "REPEAT_S", 0.0)  # a second press, later
    with pytest.raises(KeyboardInterrupt, match=r"stopped at once without saving; no checkpoint of this run had been saved yet"):
        baseline(tmp_path / "b", hook=SignalAt(3, signal.SIGINT, count=2), num_iterations=6)
    assert not os.path.exists(os.path.join(folder(tmp_path / "b"), CHECKPOINT_NAME))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop's handlers are gone again


# -------------------------------------------------------------------- stops under torchrun (2 gloo ranks)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", RUNNER]
DDP = dict(TINY, num_iterations=4, svd_interval=2, adaptive_svd_target_layer=-1, svd_targets="all")


def torchrun(base, out, args, log_path, **extra_env):
    # a flag in args replaces its DDP default (the CLI refuses a flag given twice)
    return subprocess.Popen([*TORCHRUN, *with_defaults(args, DDP), f"--output_dir={out}"], cwd=ROOT, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env=dict(env(base), DIST_RUN_OUT=str(out), **extra_env))


def finished(proc, log_path, timeout=300):
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, text(log_path)[-3000:]
    return text(log_path)


def rank_result(out, rank=0):
    return json.load(open(os.path.join(out, f"rank{rank}.json")))


def ranks_stop(base, tmp_path, started, signal_ranks, run_args=(), **extra_env):
    """Reference run; a run (with run_args) signalled, SIGTERM to the given ranks only, once `started` is in its
    log; its resume. The resumed run must end as the reference did."""
    ref, run, args = tmp_path / "ref", tmp_path / "run", ["--eval_every=-1"]
    finished(torchrun(base, ref, args, tmp_path / "ref.log"), tmp_path / "ref.log")
    log_path = tmp_path / "run.log"
    proc = torchrun(base, run, [*args, *run_args], log_path, **extra_env)
    wait_for(lambda: started in text(log_path), proc, timeout=300, what=started)
    for rank in signal_ranks:
        os.kill(int(open(run / f"pid{rank}").read()), signal.SIGTERM)
    t0 = time.time()
    proc.wait(timeout=60)
    took = time.time() - t0
    stopped = text(log_path)
    assert proc.returncode == 0 and stopped.count("Stopped by signal 15") == 1, stopped[-3000:]
    finished(torchrun(base, run, [*args, "--resume"], tmp_path / "resume.log"), tmp_path / "resume.log")
    a, b = rank_result(ref), rank_result(run)
    assert a["losses"][len(a["losses"]) - len(b["losses"]):] == b["losses"] and a["params"] == b["params"] and a["val_bpb"] == b["val_bpb"]
    assert rows(os.path.join(folder(run), "svd_metrics.jsonl")) == rows(os.path.join(folder(ref), "svd_metrics.jsonl"))
    assert rows(os.path.join(folder(run), "train_metrics.jsonl")) == rows(os.path.join(folder(ref), "train_metrics.jsonl"))
    return took, stopped


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_within_an_evaluation_batch(base, tmp_path):
    took, out = ranks_stop(base, tmp_path, "step 00004/00004", [1], ["--eval_tokens=20000000"])
    assert took < STOP_BOUND_S and "Stopped by signal 15 at step 4" in out and "Step 00004 | Validation bpb" not in out


@pytest.mark.slow
def test_ranks_signalled_in_an_analysis_stop_together_after_their_current_layer(base, tmp_path):
    took, out = ranks_stop(base, tmp_path, "=== SVD Analysis at step 2 ===", [0, 1], DIST_RUN_SLOW_SVD="2")
    assert took < 2 + STOP_BOUND_S and "Stopped by signal 15 at step 1" in out and "SVD Analysis complete" not in out
