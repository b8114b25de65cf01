"""The one pretraining loop, shared by the baseline and the adaptive-SVD run.

`train(cfg, hook)` does nanochat's base training: horizon precedence, gradient accumulation, LR and
momentum schedules, clipping, periodic validation bpb, sampling, checkpoints and exact resume.
A `TrainHook` is where a method plugs in without forking the loop: it may swap layers before the
optimizers exist, and it runs once per update after the gradients are final and before the
optimizer step (which is where the adaptive-SVD analysis happens).

The run folder never loses history (nanochat.run_files): one process owns it (a lock, from before it is
read to the end of the run); a fresh run refuses a folder that holds a run unless --overwrite=true; files
are touched only once every check has passed; rank 0 appends one row per step to train_metrics.jsonl.
A resume continues the saved run exactly and says which flags may differ (nanochat.resume_terms). Stop
signals (nanochat.stopping) take effect within a micro-batch, an evaluation batch or an analysed layer;
the last completed step is saved and resume stays exact. A diverged or collapsed run stops before the
step's update and never saves (nanochat.health).

Continued training: --init_from starts a new run from another run's checkpoint (weights and optimizer
state; fresh step counter, LR schedule, data position and hook state; the source file is only read),
--replay_data_dir/--replay_fraction mix an earlier domain's data into the stream, and --extra_val_dir
measures a second validation set at every evaluation.
"""

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat import resume_terms
from nanochat.checkpoint_manager import CHECKPOINT_NAME, WriteFailed, checkpoint_dir, load_checkpoint, save_checkpoint
from nanochat.cli import flag
from nanochat.common import (UserError, check_device_type, compute_cleanup, compute_init, device_peak_flops,
                             first_sentence, get_dist_info, peak_memory_mib, print0, print_banner)
from nanochat.core_eval import evaluate_core, load_bundle
from nanochat.dataloader import DataLoader, ReplayLoader
from nanochat.dataset import list_shards
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.health import Diverged, Health
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import build_optimizers, muon_momentum
from nanochat.run_files import RunFolder
from nanochat.stopping import StopSignals, StopTraining
from nanochat.precision import DTYPES, autocast_for, resolve_dtype
from nanochat.tokenizer import get_token_bytes, get_tokenizer

TRAIN_METRICS = "train_metrics.jsonl"
ESTIMATE_AFTER = 5  # steps of this process before the time estimate (the first ones include warm-up)


@dataclass
class TrainConfig:
    run: str = flag("", "wandb run name; empty = no wandb (WANDB_MODE=offline works on clusters)")
    device_type: str = flag("", "cpu | cuda | mps; empty = autodetect (CUDA > MPS > CPU)")
    depth: int = flag(-1, "number of transformer layers; model_dim = 64 * depth; -1 = 20 on CUDA (required on CPU and MPS)")
    max_seq_len: int = flag(2048, "context length in tokens")
    num_iterations: int = flag(-1, "number of optimizer steps; -1 = derive from target_flops or the data:param ratio")
    target_flops: float = flag(-1.0, "compute budget in FLOPs; used when num_iterations = -1")
    target_param_data_ratio: int = flag(20, "tokens per parameter (Chinchilla); used when both above are -1")
    device_batch_size: int = flag(32, "sequences per forward/backward on one device")
    total_batch_size: int = flag(524288, "tokens per optimizer step (all ranks, all micro-batches)")
    embedding_lr: float = flag(0.2, "AdamW learning rate of the token embedding (scaled by (model_dim/768)^-0.5)")
    unembedding_lr: float = flag(0.004, "AdamW learning rate of lm_head (scaled by (model_dim/768)^-0.5)")
    matrix_lr: float = flag(0.02, "Muon learning rate of the block matrices")
    weight_decay: float = flag(0.0, "AdamW weight decay of embedding and lm_head")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this value; 0 = no clipping")
    warmup_ratio: float = flag(0.0, "fraction of steps with linear LR warmup")
    warmdown_ratio: float = flag(0.2, "fraction of steps at the end with linear LR decay")
    final_lr_frac: float = flag(0.0, "LR multiplier reached at the end of the warmdown")
    eval_every: int = flag(250, "evaluate validation bpb every N steps (and at the end); -1 = only at the end")
    eval_tokens: int = flag(20 * 524288, "validation tokens per evaluation")
    core_metric_every: int = flag(-1, "CORE metric (DCLM) every N steps and at the end; -1 = off. Needs the eval bundle in "
                                  "$NANOCHAT_BASE_DIR/eval_bundle (python -m scripts.base_eval --download_bundle)")
    core_metric_max_per_task: int = flag(500, "examples per task for the in-training CORE metric; -1 = all")
    sample_every: int = flag(2000, "print samples every N steps (and at the end); -1 = only at the end")
    save_every: int = flag(-1, "also save a checkpoint every N steps; -1 = only at the end")
    model_tag: str = flag("", "checkpoint folder name under base_checkpoints/; empty = the script's default")
    output_dir: str = flag(".", "directory that holds base_checkpoints/")
    data_dir: str = flag("", "directory of parquet shards; empty = $NANOCHAT_BASE_DIR/base_data")
    replay_data_dir: str = flag("", "a second data directory mixed into training at --replay_fraction (e.g. replay of an "
                                    "earlier domain); only its train shards are read")
    replay_fraction: float = flag(0.0, "share of training sequences drawn from --replay_data_dir, chosen by a draw seeded "
                                       "with --seed; 0 = no replay")
    extra_val_dir: str = flag("", "also measure val bpb on this directory's val shard at every evaluation "
                                  "(train_metrics.jsonl: extra_val_bpb), e.g. the earlier domain during continued training")
    init_from: str = flag("", "start a new run from another run's checkpoint.pt: its weights and optimizer state, with a "
                              "fresh step counter, LR schedule, data position and adaptive-SVD state")
    resume: bool = flag(False, "continue the run saved in base_checkpoints/<tag>/checkpoint.pt exactly")
    overwrite: bool = flag(False, "start a fresh run in a folder that holds a run, deleting its checkpoint and metrics "
                                  "(without it, such a run is refused)")
    compile: str = flag("auto", "torch.compile: auto (on for CUDA only) | true | false")
    dtype: str = flag("auto", "matmul dtype: auto | float32 | bfloat16. auto = bf16 on CUDA, and on a CPU with native "
                      "bf16 where a bf16 matmul measures faster than fp32; else fp32. Recorded; --resume reuses it")
    seed: int = flag(42, "random seed of the model init")


def validate(cfg):
    """Range checks before anything is created or written."""
    checks = [
        (cfg.depth >= 1 or cfg.depth == -1, "--depth must be >= 1 (or -1: 20 on CUDA)"),
        (not (cfg.resume and cfg.overwrite), "--resume continues the run in its folder and --overwrite replaces it; give one of them"),
        (cfg.max_seq_len >= 2, "--max_seq_len must be >= 2"),
        (cfg.device_batch_size >= 1, "--device_batch_size must be >= 1"),
        (cfg.total_batch_size >= 1, "--total_batch_size must be >= 1"),
        (cfg.num_iterations == -1 or cfg.num_iterations >= 1, "--num_iterations must be >= 1 (or -1 to derive it)"),
        (cfg.target_param_data_ratio > 0, "--target_param_data_ratio must be > 0"),
        (cfg.matrix_lr > 0 and cfg.embedding_lr > 0 and cfg.unembedding_lr > 0, "learning rates must be > 0"),
        (cfg.grad_clip >= 0, "--grad_clip must be >= 0"),
        (0 <= cfg.warmup_ratio <= 1 and 0 <= cfg.warmdown_ratio <= 1 and cfg.warmup_ratio + cfg.warmdown_ratio <= 1,
         "--warmup_ratio and --warmdown_ratio must lie in [0, 1] and add up to at most 1"),
        (0 <= cfg.final_lr_frac <= 1, "--final_lr_frac must lie in [0, 1]"),
        (cfg.eval_every == -1 or cfg.eval_every >= 1, "--eval_every must be >= 1 or -1"),
        (cfg.eval_tokens >= 1, "--eval_tokens must be >= 1"),
        (cfg.sample_every == -1 or cfg.sample_every >= 1, "--sample_every must be >= 1 or -1"),
        (cfg.save_every == -1 or cfg.save_every >= 1, "--save_every must be >= 1 or -1"),
        (cfg.compile in ("auto", "true", "false"), "--compile must be auto, true or false"),
        (cfg.dtype in ("auto", *DTYPES), "--dtype must be auto, float32 or bfloat16"),
        (0 <= cfg.replay_fraction < 1, "--replay_fraction must lie in [0, 1)"),
        (bool(cfg.replay_data_dir) == (cfg.replay_fraction > 0),
         "--replay_data_dir and --replay_fraction go together: give both (e.g. --replay_data_dir=DIR --replay_fraction=0.05) "
         "or neither"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if cfg.core_metric_every > 0 and (cfg.core_metric_max_per_task == 0 or cfg.core_metric_max_per_task < -1):
        raise UserError("--core_metric_max_per_task must be >= 1 or -1 (all)")


class TrainHook:
    """No-op hook: the plain baseline. Subclasses add a method to the same loop."""
    name = "baseline"

    def prepare_model(self, model):
        """Called after init, before the optimizers exist: swap layers here."""

    def attach(self, run):
        """Called once the optimizers, output directory and logger exist."""

    def after_backward(self, step, last_step):
        """Called for update number `step` (1-based) with final, reduced, clipped gradients."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        """Restore what state_dict returned, after the dense weights and before optimizer state."""

    def summary(self):
        return {}


@dataclass
class Run:
    """What a hook may use of the live run."""
    cfg: TrainConfig
    model: GPT
    muon: object
    adamw: object
    device: torch.device
    ckpt_dir: str
    log: object  # log(dict, step) -> wandb when enabled
    rank: int
    world_size: int
    stop: StopSignals = None
    folder: RunFolder = None

    def jsonl(self, name):
        """The run's metrics file `name` (next to the checkpoint): call `.write(record)` on any rank, rank 0
        writes. Each record needs an int "step" (and "layer" for per-layer records): on --resume the rows
        after the checkpoint's step are dropped, so a row is never logged twice. Nothing is opened or
        truncated before training really starts."""
        if self.folder is None:
            self.folder = RunFolder(self.ckpt_dir, self.rank)
        return self.folder.jsonl(name)

    def stop_requested(self):
        """This rank got a stop signal (no communication): skip the rest of this rank's own work, then
        call stop_check() at a point every rank reaches."""
        return self.stop is not None and self.stop.requested()

    def stop_check(self):
        """Raise nanochat.stopping.StopTraining (on every rank together) once a stop signal has arrived; the
        loop then saves the last completed step. Call it the same number of times on every rank; change
        nothing before it that the checkpoint of that step must not see."""
        if self.stop is not None:
            self.stop.check()


def lr_multiplier(it, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def _init_wandb(cfg, master, run_dir):
    """wandb for --run=NAME on the master rank. Its folder goes next to the checkpoints (run_dir/wandb), or
    under $WANDB_DIR when set, never into the current directory."""
    if not cfg.run or not master:
        return None
    try:
        import wandb
    except ImportError:
        print0("wandb is not installed; continuing without it")
        return None
    wandb_dir = os.environ.get("WANDB_DIR") or run_dir
    os.makedirs(wandb_dir, exist_ok=True)
    for mode in (None, "offline"):
        try:
            return wandb.init(project="nanochat", name=cfg.run, config=dataclasses.asdict(cfg), mode=mode, dir=wandb_dir)
        except Exception as e:  # a missing login or no network must never stop training
            print0(f"wandb init failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                   + ("retrying offline" if mode is None else "continuing without wandb"))
    return None


def _resolve_horizon(cfg, num_params, flops_per_token):
    if cfg.num_iterations > 0:
        print0(f"Using user-provided number of iterations: {cfg.num_iterations:,}")
        return cfg.num_iterations
    if cfg.target_flops > 0:
        n = round(cfg.target_flops / (flops_per_token * cfg.total_batch_size))
        print0(f"Calculated number of iterations from target FLOPs: {n:,}")
        return max(1, n)
    n = max(1, (cfg.target_param_data_ratio * num_params) // cfg.total_batch_size)
    print0(f"Calculated number of iterations from target data:param ratio: {n:,}")
    return n


def _resolve_depth(cfg, device_type):
    """--depth=-1: d20 on CUDA; on CPU and MPS a model size must be chosen (d20 would take days there)."""
    if cfg.depth != -1:
        return cfg
    if device_type != "cuda":
        raise UserError(f"--depth is required on {device_type}: the default (depth 20, about 560M parameters) is sized for "
                        f"GPUs; choose a small model, e.g. --depth=4 as in the Phase 1 guide")
    print0("Using --depth=20 (the default on CUDA)")
    return dataclasses.replace(cfg, depth=20)


def train(cfg, hook=None, default_tag=None):
    """Train; `default_tag` names the run folder when --model_tag is empty ("{depth}" is filled in). The run
    folder is locked (nanochat.run_lock) before it is read and given back when the run ends, however it ends."""
    claimed = []
    try:
        return _train(cfg, hook, default_tag, claimed)
    finally:
        for folder in claimed:
            folder.release()


def _train(cfg, hook, default_tag, claimed):
    hook = hook or TrainHook()
    validate(cfg)
    device_type = check_device_type(cfg.device_type)
    cfg = _resolve_depth(cfg, device_type)
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes()
    _check_data(cfg)
    # the CORE bundle is read now, so a missing one stops the run before any training
    core_tasks = load_bundle(max_per_task=cfg.core_metric_max_per_task) if cfg.core_metric_every > 0 else None
    model_tag = cfg.model_tag or (default_tag or "d{depth}").format(depth=cfg.depth)
    ckpt_dir = checkpoint_dir(cfg.output_dir, model_tag)
    folder = RunFolder(ckpt_dir, get_dist_info()[1])
    claimed.append(folder)
    folder.claim()  # before anything reads the folder or decides about it
    init_ckpt = None
    if cfg.init_from and not cfg.resume:  # a resumed run's checkpoint already holds what --init_from gave it
        init_ckpt = _load_init(cfg.init_from, ckpt_dir, GPTConfig.from_depth(cfg.depth, tokenizer.get_vocab_size(), cfg.max_seq_len))
    if cfg.resume:
        resume_ckpt = load_checkpoint(os.path.join(ckpt_dir, CHECKPOINT_NAME))
    else:
        folder.check_fresh(cfg.overwrite)
        resume_ckpt = None

    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    master = rank == 0
    if ddp:
        print0(f"Distributed: {world_size} ranks, backend {dist.get_backend()}; gradients all-reduced before clipping, "
               f"optimizer state replicated")
    torch.manual_seed(cfg.seed)
    print_banner()
    saved_cfg = resume_ckpt["metadata"].get("train_config", {}) if resume_ckpt is not None else None
    dtype, why = resolve_dtype(cfg.dtype, device_type, saved_cfg)
    print0(f"Matmul dtype: {dtype} ({why})")
    cfg = dataclasses.replace(cfg, dtype=dtype)  # config.json and the checkpoint record the resolved dtype

    vocab_size = tokenizer.get_vocab_size()
    print0(f"Vocab size: {vocab_size:,}")
    model_config = GPTConfig.from_depth(cfg.depth, vocab_size, cfg.max_seq_len)
    print0(f"num_layers: {model_config.n_layer}")
    print0(f"model_dim: {model_config.n_embd}")
    print0(f"num_heads: {model_config.n_head}")
    print0(f"num_kv_heads: {model_config.n_kv_head}")

    tokens_per_fwdbwd = cfg.device_batch_size * cfg.max_seq_len * world_size
    if cfg.total_batch_size % tokens_per_fwdbwd != 0:
        raise UserError(f"--total_batch_size={cfg.total_batch_size} is not a multiple of device_batch_size * max_seq_len * "
                        f"world_size = {tokens_per_fwdbwd}; pick a total batch that divides exactly")
    grad_accum_steps = cfg.total_batch_size // tokens_per_fwdbwd
    eval_steps = cfg.eval_tokens // tokens_per_fwdbwd
    if eval_steps < 1:
        raise UserError(f"--eval_tokens={cfg.eval_tokens} is less than one batch ({tokens_per_fwdbwd} tokens); raise it")
    print0(f"Tokens / micro-batch / rank: {cfg.device_batch_size} x {cfg.max_seq_len} = {cfg.device_batch_size * cfg.max_seq_len:,}")
    print0(f"Total batch size {cfg.total_batch_size:,} => gradient accumulation steps: {grad_accum_steps}")

    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    hook.prepare_model(model)
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    print0(f"Number of parameters: {num_params:,}")
    print0(f"Estimated FLOPs per token: {flops_per_token:e}")
    num_iterations = _resolve_horizon(cfg, num_params, flops_per_token)
    print0(f"Total number of training tokens: {num_iterations * cfg.total_batch_size:,}")
    print0(f"Tokens : Params ratio: {num_iterations * cfg.total_batch_size / num_params:.2f}")
    print0(f"Total training FLOPs estimate: {flops_per_token * num_iterations * cfg.total_batch_size:e}")
    health = Health(vocab_size, round(cfg.warmup_ratio * num_iterations), note=lambda: folder.kept(resume=False))
    print0(health.describe())

    muon, adamw = build_optimizers(model, cfg.matrix_lr, cfg.embedding_lr, cfg.unembedding_lr, cfg.weight_decay,
                                   ns_dtype=DTYPES[dtype])
    wandb_run = _init_wandb(cfg, master, ckpt_dir)

    def log(data, step):
        if wandb_run is not None:
            wandb_run.log(data, step=step)

    stop = StopSignals(device, ddp)
    run = Run(cfg, model, muon, adamw, device, ckpt_dir, log, rank, world_size, stop, folder)
    hook.attach(run)
    train_metrics = folder.jsonl(TRAIN_METRICS)

    step, smooth_loss, total_time, min_val_bpb, loader_state = 0, 0.0, 0.0, float("inf"), None
    loop_state = {}
    resumes = []  # each resume that changed a flag: the record of what ran, config.json holding the latest values
    if resume_ckpt is not None:
        loop_state = resume_ckpt["loop"]
        step, smooth_loss, total_time, min_val_bpb, loader_state, changed = _restore(
            resume_ckpt, cfg, model, muon, adamw, hook, rank, world_size, num_iterations)
        print0(f"Resumed from {ckpt_dir} at step {step}")
        init_info = resume_ckpt["metadata"].get("init_from")
        resumes = resume_ckpt["metadata"].get("resumes", []) + ([{"step": step, "changed": changed}] if changed else [])
    elif init_ckpt is not None:
        init_info = _init_from(init_ckpt, cfg.init_from, model, muon, adamw)
    else:
        init_info = None

    start_step = step
    use_compile = cfg.compile == "true" or (cfg.compile == "auto" and device_type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    autocast = autocast_for(device_type, dtype)
    data_dir = cfg.data_dir or None
    if cfg.replay_fraction > 0:
        train_loader = ReplayLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, device, data_dir, cfg.replay_data_dir,
                                    cfg.replay_fraction, cfg.seed, rank=rank, world_size=world_size, state=loader_state)
        print0(f"Replay: {cfg.replay_fraction:.1%} of the training sequences from {cfg.replay_data_dir}")
    else:
        train_loader = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "train", device,
                                  rank=rank, world_size=world_size, data_dir=data_dir, state=loader_state)
    train_iter = iter(train_loader)
    peak_flops = device_peak_flops(device)
    ema_beta = 0.9
    val_bpb = resume_ckpt["metadata"].get("val_bpb") if resume_ckpt is not None else None
    val_step = loop_state.get("val_step")  # the step of val_bpb: a resumed run does not repeat that evaluation
    core = resume_ckpt["metadata"].get("core") if resume_ckpt is not None else None  # the latest CORE result
    # train_metrics.jsonl gets one row per step, written once the step's evaluations are done; a row
    # whose evaluation a stop abandoned travels in the checkpoint and is completed after --resume
    pending_row = loop_state.get("pending_row")
    losses = []  # raw per-step training loss of this process, returned for tests and reports
    step_times = []

    # every check has passed: from here on the run's files change
    folder.start(resume_ckpt, cfg.overwrite, {TRAIN_METRICS: step - 1} if pending_row else None)
    every = f"every {cfg.eval_every:,} steps and at the end" if cfg.eval_every > 0 else "at the end"
    later = f"; a time estimate follows after {ESTIMATE_AFTER} steps" if num_iterations - step > ESTIMATE_AFTER else ""
    print0(f"Plan: {num_iterations - step:,} steps of {cfg.total_batch_size:,} tokens to go "
           f"({(num_iterations - step) * cfg.total_batch_size:,} tokens), validation on {eval_steps * tokens_per_fwdbwd:,} "
           f"tokens {every}{later}")
    # the state a save describes: the last completed step (a stop mid-step must not see later batches)
    resume_point = (train_loader.state_dict(), _rng_state(device))

    def save(step):
        blocker = health.save_blocker()
        if blocker:  # a collapse is under way: the last good checkpoint stays
            if step == num_iterations:
                raise Diverged(f"training collapsed at its last step {step}: {blocker}; the step was not saved; "
                               f"{folder.kept(resume=False)}")
            print0(f"Not saving step {step}: {blocker}")
            return
        with stop.saving():  # a second signal cannot interrupt the write
            _save(step)

    def _save(step):
        loader_states = [None] * world_size
        if ddp:
            dist.all_gather_object(loader_states, resume_point[0])
        else:
            loader_states = [resume_point[0]]
        hook_state = hook.state_dict()
        failure = None
        if master:
            ckpt = {
                "model": model.state_dict(),
                "metadata": {"model_config": model_config.to_dict(), "step": step, "val_bpb": val_bpb,
                             "train_config": dataclasses.asdict(cfg), "num_iterations": num_iterations,
                             "run_kind": hook.name, "world_size": world_size, "core": core, "init_from": init_info,
                             "resumes": resumes},
                "optim": {"muon": muon.state_dict(), "adamw": adamw.state_dict()},
                "loop": {"step": step, "smooth_loss": smooth_loss, "total_time": total_time,
                         "min_val_bpb": min_val_bpb, "dataloader": loader_states, "val_step": val_step,
                         "pending_row": pending_row},
                "rng": resume_point[1],
                "adaptive": hook_state,
            }
            config = {"model_config": model_config.to_dict(), "train_config": dataclasses.asdict(cfg), "step": step,
                      "num_iterations": num_iterations, "val_bpb": val_bpb, "min_val_bpb": _finite_or_none(min_val_bpb),
                      "run_kind": hook.name, "adaptive": hook.summary(),
                      "core_metric": core["core_metric"] if core else None, "core": core, "init_from": init_info,
                      "resumes": resumes}
            try:
                save_checkpoint(ckpt_dir, ckpt, config)
            except (WriteFailed, Diverged) as e:
                failure = folder.failed(e)
        if ddp:  # every rank learns whether the save worked, so none waits for a rank that stopped
            ok = torch.tensor(0 if failure else 1, device=device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if not ok.item() and failure is None:
                raise UserError("rank 0 could not write the checkpoint (see its error)")
        if failure:
            raise failure
        folder.saved_step = step
        print0(f"Saved checkpoint to {ckpt_dir} (step {step})")

    stop.install(folder.kept)
    try:
        while True:
            last_step = step == num_iterations
            if (last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0)) and val_step != step:
                model.eval()
                val_loader = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "val", device,
                                        rank=rank, world_size=world_size, data_dir=data_dir)
                with autocast:
                    bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes, stop=stop)
                measured = {"val_bpb": bpb}
                if cfg.extra_val_dir:  # the same weights and token budget on the other directory's val shard
                    extra_loader = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "val", device,
                                              rank=rank, world_size=world_size, data_dir=cfg.extra_val_dir)
                    with autocast:
                        measured["extra_val_bpb"] = evaluate_bpb(model, extra_loader, eval_steps, token_bytes, stop=stop)
                model.train()
                val_bpb, val_step = bpb, step
                min_val_bpb = min(min_val_bpb, val_bpb)
                print0(f"Step {step:05d} | Validation bpb: {val_bpb:.4f}")
                if cfg.extra_val_dir:
                    print0(f"Step {step:05d} | Extra validation bpb: {measured['extra_val_bpb']:.4f} ({cfg.extra_val_dir})")
                log({"val/bpb": val_bpb, **({"val/extra_bpb": measured["extra_val_bpb"]} if cfg.extra_val_dir else {})}, step)
                pending_row = {**(pending_row or {"step": step}), **measured}
            if (core_tasks is not None and step > 0 and (last_step or step % cfg.core_metric_every == 0)
                    and not (core and core["step"] == step)):  # a resumed run does not redo its last result
                core = _core_metric(model, tokenizer, device, core_tasks, autocast, step, log, stop)
                pending_row = {**(pending_row or {"step": step}), "core_metric": core["core_metric"]}
            if pending_row is not None:
                train_metrics.write(pending_row)
                pending_row = None
            if master and (last_step or (cfg.sample_every > 0 and step > 0 and step % cfg.sample_every == 0)):
                _print_samples(model, tokenizer, autocast)
            if (last_step or (cfg.save_every > 0 and step > start_step and step % cfg.save_every == 0)) and folder.saved_step != step:
                save(step)
            if last_step:
                break
            stop.check()

            t0 = time.time()
            micro_losses = []
            for micro in range(grad_accum_steps):
                if micro:
                    stop.check()
                x, y = next(train_iter)
                with autocast:
                    loss = train_model(x, y)
                micro_losses.append(loss.detach())
                (loss / grad_accum_steps).backward()
            # the step's loss is the mean over its micro-batches (and over ranks below), so N ranks and one
            # process with N times the accumulation report the same number
            train_loss = torch.stack(micro_losses).mean()
            if ddp:
                _all_reduce_grads(model, world_size)
                dist.all_reduce(train_loss)
                train_loss /= world_size
            grad_norm = clip_gradients(model, cfg.grad_clip, muon.params() + [p for g in adamw.param_groups for p in g["params"]])
            loss_value = train_loss.item()
            health.check(step + 1, loss_value, grad_norm.item())  # before the update: a bad one is never applied
            hook.after_backward(step + 1, step + 1 == num_iterations)
            lrm = lr_multiplier(step, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
            for opt in (muon, adamw):
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
            muon.param_groups[0]["momentum"] = muon_momentum(step)
            muon.step()
            adamw.step()
            model.zero_grad(set_to_none=True)
            if device_type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            step += 1
            resume_point = (train_loader.state_dict(), _rng_state(device))

            losses.append(loss_value)
            smooth_loss = ema_beta * smooth_loss + (1 - ema_beta) * loss_value
            debiased = smooth_loss / (1 - ema_beta ** step)
            total_time += dt
            tok_per_sec = int(cfg.total_batch_size / dt)
            mfu = f"{100 * flops_per_token * cfg.total_batch_size / dt / (peak_flops * world_size):.2f}" if peak_flops else "n/a"
            pct = 100 * step / num_iterations
            print0(f"step {step:05d}/{num_iterations:05d} ({pct:.2f}%) | loss: {debiased:.6f} | grad norm: {grad_norm.item():.4f} | "
                   f"lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu} | total time: {total_time / 60:.2f}m")
            log({"train/loss": debiased, "train/grad_norm": grad_norm.item(), "train/lrm": lrm, "train/dt": dt,
                 "train/tok_per_sec": tok_per_sec}, step)
            pending_row = {"step": step, "loss": debiased, "raw_loss": loss_value, "grad_norm": grad_norm.item(), "lrm": lrm,
                           "dt": dt, "tok_per_sec": tok_per_sec, "total_time": total_time}
            step_times.append(dt)
            if len(step_times) == ESTIMATE_AFTER and step < num_iterations:
                _print_estimate(step_times, num_iterations - step)
    except StopTraining:
        # the partial step, evaluation or analysis is dropped: the checkpoint describes the last completed step
        model.zero_grad(set_to_none=True)
        if folder.saved_step != step:
            save(step)
        print0(f"Stopped by signal {stop.agreed} at step {step}; continue with --resume")
    finally:
        stop.restore()
        folder.close()

    if cfg.replay_fraction > 0:
        print0(f"Replay: {train_loader.replayed:,} of {train_loader.sequences:,} training sequences on rank {rank} came from "
               f"{cfg.replay_data_dir}")
    print0(f"Peak memory usage: {peak_memory_mib(device_type):.2f} MiB")
    print0(f"Total training time: {total_time / 60:.2f}m")
    print0(f"Minimum validation bpb: {min_val_bpb:.4f}")
    if wandb_run is not None:
        wandb_run.summary["min_val_bpb"] = min_val_bpb
        wandb_run.finish()
    compute_cleanup()
    return {"step": step, "min_val_bpb": min_val_bpb, "val_bpb": val_bpb, "ckpt_dir": ckpt_dir,
            "total_time": total_time, "num_iterations": num_iterations, "losses": losses,
            "stopped_by_signal": stop.agreed, "core_metric": core["core_metric"] if core else None}


def _print_estimate(step_times, steps_left):
    """The cost of the rest of the run on this device, from the median of this process's first steps."""
    per_step = sorted(step_times)[len(step_times) // 2]
    total = per_step * steps_left
    took = f"{total:.0f} s" if total < 60 else f"{total / 60:.1f} min" if total < 3600 else f"{total / 3600:.1f} h"
    print0(f"Estimated time for the remaining {steps_left:,} steps: {took} at {per_step * 1000:.0f} ms/step "
           f"(median of the first {len(step_times)}; evaluations and saves come on top)")


def _rng_state(device):
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0)}


def _core_metric(model, tokenizer, device, tasks, autocast, step, log, stop=None):
    """CORE on the uncompiled model (prompt lengths vary); every rank takes part."""
    model.eval()
    with autocast:
        out = evaluate_core(model, tokenizer, device, tasks=tasks, stop=stop)
    model.train()
    print0(f"Step {step:05d} | CORE metric: {out['core_metric']:.4f}")
    log({"core_metric": out["core_metric"], **{f"core/{label}": v for label, v in out["centered_results"].items()}}, step)
    return {"step": step, "core_metric": out["core_metric"], "centered_results": out["centered_results"],
            "results": out["results"]}


def clip_gradients(model, max_norm, trained=None):
    """Global-norm clipping over the `trained` parameters (default: all), rescaling every gradient
    of the model, and only when the norm exceeds max_norm (0 = never): the usual unconditional
    multiply by min(1, max_norm/norm) is a full pass over every gradient. A low-rank layer's frozen
    weight carries dL/dW_eff for the analysis; it is scaled with the rest but not counted twice."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    counted = grads if trained is None else [p.grad for p in trained if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(counted)
    if max_norm > 0 and norm.item() > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm.item() + 1e-6))
    return norm


def _finite_or_none(x):
    return x if math.isfinite(x) else None


def _all_reduce_grads(model, world_size):
    """Average gradients over ranks in place, all reductions in flight at once (no flat copy: at
    d20 that would be 2.2 GB written and read back every step)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for work in [dist.all_reduce(g, async_op=True) for g in grads]:
        work.wait()
    torch._foreach_div_(grads, world_size)


def _check_data(cfg):
    """Every data directory the run reads, before anything slow: a missing split stops the run now."""
    list_shards(cfg.data_dir or None, "train")
    list_shards(cfg.data_dir or None, "val")
    if cfg.replay_data_dir:
        list_shards(cfg.replay_data_dir, "train")
    if cfg.extra_val_dir:
        list_shards(cfg.extra_val_dir, "val")


SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size")


def _load_init(path, ckpt_dir, model_config):
    """The checkpoint --init_from names, read (never written) and checked against this run's model shape."""
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(ckpt_dir):
        raise UserError(f"--init_from={path} is in this run's own folder, where this run saves its checkpoint; give the new "
                        f"run another --model_tag or --output_dir")
    ckpt = load_checkpoint(path)
    theirs, mine = ckpt["metadata"]["model_config"], model_config.to_dict()
    if any(theirs.get(k) != mine[k] for k in SHAPE_KEYS):
        shape = lambda c: ", ".join(f"{k}={c.get(k)}" for k in SHAPE_KEYS)
        raise UserError(f"--init_from={path} holds another model shape ({shape(theirs)}) than this run builds ({shape(mine)}); "
                        f"use the same --depth and tokenizer, or another checkpoint")
    return ckpt


def _init_from(ckpt, path, model, muon, adamw):
    """Weights and optimizer state (Muon momentum, AdamW moments) from another run's checkpoint. The
    optimizers keep this run's settings (learning rates, betas): only their state is carried over."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        for opt, state in ((muon, ckpt["optim"]["muon"]), (adamw, ckpt["optim"]["adamw"])):
            settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            opt.load_state_dict(state)
            for group, own in zip(opt.param_groups, settings):
                group.update(own)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"--init_from={path} does not match this model ({first_sentence(e)})") from None
    meta = ckpt["metadata"]
    print0(f"Initialised from {path} (step {meta['step']} of a {meta.get('run_kind', '?')} run): weights and optimizer "
           f"state; fresh step counter, LR schedule, data position and adaptive-SVD state")
    return {"path": os.path.abspath(path), "step": meta["step"], "run_kind": meta.get("run_kind"), "val_bpb": meta.get("val_bpb"),
            "data_dir": meta.get("train_config", {}).get("data_dir")}


def _restore(ckpt, cfg, model, muon, adamw, hook, rank, world_size, num_iterations):
    changes = resume_terms.check(ckpt["metadata"].get("train_config", {}), cfg)
    resume_terms.check_horizon(ckpt["loop"]["step"], num_iterations)
    if ckpt["metadata"].get("world_size", 1) != world_size:
        raise UserError(f"--resume: the checkpoint was written by {ckpt['metadata']['world_size']} ranks, this run has {world_size}")
    saved_horizon = ckpt["metadata"].get("num_iterations")
    for line in resume_terms.describe(cfg, ckpt["loop"]["step"], saved_horizon, num_iterations, changes,
                                      "adaptive-SVD state" if ckpt.get("adaptive") else ""):
        print0(line)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        hook.load_state_dict(ckpt.get("adaptive", {}))
        muon.load_state_dict(ckpt["optim"]["muon"])
        adamw.load_state_dict(ckpt["optim"]["adamw"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"--resume: checkpoint does not match this model ({first_sentence(e)})") from None
    torch.set_rng_state(ckpt["rng"]["torch"])
    if model.get_device().type == "cuda" and ckpt["rng"]["cuda"].numel():
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], model.get_device())
    loop = ckpt["loop"]
    changed = {k: list(v) for k, v in changes.items()}  # {flag: [the checkpoint's value, this run's]}
    if saved_horizon != num_iterations:
        changed["horizon"] = [saved_horizon, num_iterations]
    return loop["step"], loop["smooth_loss"], loop["total_time"], loop["min_val_bpb"], loop["dataloader"][rank], changed


SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "The opposite of hot is",
                  "Shall I compare thee to"]


def _print_samples(model, tokenizer, autocast):
    model.eval()
    engine = Engine(model, tokenizer)
    with autocast:
        for prompt in SAMPLE_PROMPTS:
            tokens = tokenizer(prompt, prepend="<|bos|>")
            sample, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
            print0(json.dumps(tokenizer.decode(sample[0][1:]), ensure_ascii=False))
    model.train()
