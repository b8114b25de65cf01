"""The one pretraining loop, shared by the baseline and the adaptive-SVD run.

`train(cfg, hook)` reads top to bottom: setup (every check and read; nothing written) -> build
(processes, model, optimizers, hook) -> restore (fresh, --resume or --init_from, and the data at its
position) -> per step: evaluate, step (the hook's analysis runs inside it, between backward and the
optimizer update), save -> finish. It is nanochat's base training: horizon precedence, gradient
accumulation, LR and momentum schedules, clipping, periodic validation bpb, sampling, checkpoints and
exact resume. A method plugs in through nanochat.hooks.TrainHook. What the loop carries from step to
step is one LoopState, which the checkpoint holds and --resume reads back.

The run folder never loses history (nanochat.run_files): one process owns it (a lock, from setup, before
the folder is read, to the end of the run); a fresh run refuses a folder that holds a run unless
--overwrite=true; files are touched only once every check has passed; rank 0 appends one row per step
to train_metrics.jsonl. A resume continues the saved run exactly and says which flags may differ
(nanochat.resume_terms). Stop signals (nanochat.stopping) take effect within a micro-batch, an
evaluation batch or an analysed layer; the last completed step is saved and resume stays exact. A
diverged or collapsed run stops before the step's update and never saves (nanochat.health).

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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanochat import resume_terms
from nanochat.checkpoint_manager import CHECKPOINT_NAME, WriteFailed, checkpoint_dir, load_checkpoint, save_checkpoint
from nanochat.cli import Check, above, at_least, between, check_config, flag, one_of
from nanochat.common import (DEVICE_TYPES, UserError, check_device_type, compute_cleanup, compute_init,
                             device_peak_flops, first_sentence, get_dist_info, peak_memory_mib, print0, print_banner)
from nanochat.core_eval import evaluate_core, load_bundle
from nanochat.dataloader import DataLoader, ReplayLoader
from nanochat.dataset import get_data_dir, list_shards
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.health import Diverged, Health
from nanochat.hooks import Run, TrainHook
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import build_optimizers, muon_momentum
from nanochat.run_files import RunFolder
from nanochat.stopping import StopSignals, StopTraining
from nanochat.precision import DTYPES, autocast_for, resolve_dtype
from nanochat.tokenizer import get_token_bytes, get_tokenizer

TRAIN_METRICS = "train_metrics.jsonl"
ESTIMATE_AFTER = 5  # steps of this process before the time estimate (the first ones include warm-up)
EMA_BETA = 0.9  # smoothing of the printed training loss (debiased)
EVERY = at_least(1).or_(-1)  # an "every N steps" flag; -1 = only at the end (or never)
FREEZE_PARTS = ("embedding", "lm_head", "blocks")


def _parts(text):
    return [p.strip() for p in text.split(",") if p.strip()]


FREEZE = Check(lambda v: all(p in FREEZE_PARTS for p in _parts(v)) and len(set(_parts(v))) == len(_parts(v)),
               "a comma list of embedding, lm_head and blocks, each once (empty = every parameter trains)")


@dataclass
class TrainConfig:
    run: str = flag("", "wandb run name; empty = no wandb (WANDB_MODE=offline works on clusters)")
    device_type: str = flag("", "cpu | cuda | mps; empty = autodetect (CUDA > MPS > CPU)", one_of("", *DEVICE_TYPES))
    depth: int = flag(-1, "number of transformer layers; model_dim = 64 * depth; -1 = 20 on CUDA (required on CPU and MPS)",
                      at_least(1).or_(-1))
    max_seq_len: int = flag(2048, "context length in tokens", at_least(2))
    num_iterations: int = flag(-1, "number of optimizer steps; -1 = derive from target_flops or the data:param ratio",
                               at_least(1).or_(-1))
    target_flops: float = flag(-1.0, "compute budget in FLOPs; used when num_iterations = -1", above(0).or_(-1.0))
    target_param_data_ratio: int = flag(20, "tokens per parameter (Chinchilla); used when both above are -1", above(0))
    device_batch_size: int = flag(32, "sequences per forward/backward on one device", at_least(1))
    total_batch_size: int = flag(524288, "tokens per optimizer step (all ranks, all micro-batches)", at_least(1))
    embedding_lr: float = flag(0.2, "AdamW learning rate of the token embedding (scaled by (model_dim/768)^-0.5)", above(0))
    unembedding_lr: float = flag(0.004, "AdamW learning rate of lm_head (scaled by (model_dim/768)^-0.5)", above(0))
    matrix_lr: float = flag(0.02, "Muon learning rate of the block matrices", above(0))
    weight_decay: float = flag(0.0, "AdamW weight decay of embedding and lm_head", at_least(0))
    grad_clip: float = flag(1.0, "clip the global gradient norm to this value; 0 = no clipping", at_least(0))
    warmup_ratio: float = flag(0.0, "fraction of steps with linear LR warmup", between(0, 1))
    warmdown_ratio: float = flag(0.2, "fraction of steps at the end with linear LR decay", between(0, 1))
    final_lr_frac: float = flag(0.0, "LR multiplier reached at the end of the warmdown", between(0, 1))
    eval_every: int = flag(250, "evaluate validation bpb every N steps (and at the end); -1 = only at the end", EVERY)
    eval_tokens: int = flag(20 * 524288, "validation tokens per evaluation", at_least(1))
    core_metric_every: int = flag(-1, "CORE metric (DCLM) every N steps and at the end; -1 = off. Needs the eval bundle in "
                                  "$NANOCHAT_BASE_DIR/eval_bundle (python -m scripts.base_eval --download_bundle)", EVERY)
    core_metric_max_per_task: int = flag(500, "examples per task for the in-training CORE metric; -1 = all", at_least(1).or_(-1))
    sample_every: int = flag(2000, "print samples every N steps (and at the end); -1 = only at the end", EVERY)
    save_every: int = flag(-1, "also save a checkpoint every N steps; -1 = only at the end", EVERY)
    model_tag: str = flag("", "checkpoint folder name under base_checkpoints/; empty = the script's default")
    output_dir: str = flag(".", "directory that holds base_checkpoints/")
    data_dir: str = flag("", "directory of parquet shards; empty = $NANOCHAT_BASE_DIR/base_data")
    replay_data_dir: str = flag("", "a second data directory mixed into training at --replay_fraction (e.g. replay of an "
                                    "earlier domain); only its train shards are read")
    replay_fraction: float = flag(0.0, "share of training sequences drawn from --replay_data_dir, chosen by a draw seeded "
                                       "with --seed; 0 = no replay", between(0, 1, open_hi=True))
    extra_val_dir: str = flag("", "also measure val bpb on this directory's val shard at every evaluation "
                                  "(train_metrics.jsonl: extra_val_bpb), e.g. the earlier domain during continued training")
    init_from: str = flag("", "start a new run from another run's checkpoint.pt: its weights and optimizer state, with a "
                              "fresh step counter, LR schedule, data position and adaptive-SVD state")
    init_data: str = flag("fresh", "with --init_from, where the training data starts: fresh = at its beginning; continue = "
                                   "where the source run stopped reading (same --data_dir, --data_seed and number of ranks, "
                                   "no replay): more of the same data, nothing the source read is read again this epoch",
                          one_of("fresh", "continue"))
    data_seed: int = flag(-1, "order of the training data: -1 = as prepared (row groups in file order); N = every epoch a "
                              "permutation of the row groups and of the documents inside each, drawn from N (ranks still "
                              "read disjoint row groups; validation data is never reordered)", at_least(0).or_(-1))
    freeze: str = flag("", "parameters that never change: a comma list of embedding (the token embedding), lm_head and "
                           "blocks (every matrix of every block); they keep their starting values bit for bit while the "
                           "rest trains as usual (the gradient clip then measures only what trains)", FREEZE)
    resume: bool = flag(False, "continue the run saved in base_checkpoints/<tag>/checkpoint.pt exactly")
    overwrite: bool = flag(False, "start a fresh run in a folder that holds a run, deleting its checkpoint and metrics "
                                  "(without it, such a run is refused)")
    compile: bool | None = flag(None, "torch.compile: true | false | auto (on for CUDA only)")
    dtype: str = flag("auto", "matmul dtype: auto | float32 | bfloat16. auto = bf16 on CUDA, and on a CPU with native "
                      "bf16 where a bf16 matmul measures faster than fp32; else fp32. Recorded; --resume reuses it",
                      one_of("auto", *DTYPES))
    seed: int = flag(42, "random seed of the model init", at_least(0))

    # rules between flags (nanochat.cli.check_config)
    CHECKS = (
        (lambda c: not (c.resume and c.overwrite),
         "--resume continues the run in its folder and --overwrite replaces it; give one of them"),
        (lambda c: c.warmup_ratio + c.warmdown_ratio <= 1,
         "--warmup_ratio={warmup_ratio} and --warmdown_ratio={warmdown_ratio} add up to more than 1"),
        (lambda c: bool(c.replay_data_dir) == (c.replay_fraction > 0),
         "--replay_data_dir and --replay_fraction go together: give both (e.g. --replay_data_dir=DIR "
         "--replay_fraction=0.05) or neither"),
        (lambda c: c.init_data == "fresh" or (c.init_from and not c.replay_data_dir),
         "--init_data=continue continues the data position of --init_from's run: give --init_from, and no replay"),
        (lambda c: len(_parts(c.freeze)) < len(FREEZE_PARTS),
         "--freeze={freeze} freezes every parameter of the model: nothing would train"),
    )


@dataclass
class LoopState:
    """What the loop carries from one step to the next. The checkpoint holds it (key "loop", with every
    rank's data position) and --resume reads it back, so a resumed run continues exactly."""
    step: int = 0                    # completed optimizer steps
    smooth_loss: float = 0.0         # EMA of the training loss, not yet debiased
    total_time: float = 0.0          # seconds spent in training steps
    min_val_bpb: float = math.inf
    val_bpb: float | None = None     # the latest validation bpb and its step: a resumed run does not repeat it
    val_step: int | None = None
    core: dict | None = None         # the latest CORE result, with its step
    # the step's train_metrics.jsonl row, written once its evaluations are done; a stop in the middle of
    # one carries it in the checkpoint, and the resumed run completes it
    pending_row: dict | None = None
    # where this rank's data and the RNG stand after `step`: a save describes the last completed step,
    # never the batches of a step a stop interrupted
    loader: dict | None = None
    rng: dict | None = None

    def to_checkpoint(self, loaders):
        """The checkpoint's "loop" entry; `loaders` is every rank's data position."""
        saved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("loader", "rng")}
        return {**saved, "dataloader": loaders}

    @classmethod
    def from_checkpoint(cls, ckpt, rank):
        loop, meta = ckpt["loop"], ckpt["metadata"]
        # older checkpoints kept the latest val bpb and CORE result only in their metadata
        state = {"val_bpb": meta.get("val_bpb"), "core": meta.get("core")}
        state.update({f.name: loop[f.name] for f in dataclasses.fields(cls) if f.name in loop})
        return cls(**state, loader=loop["dataloader"][rank], rng=ckpt["rng"])


@dataclass
class Setup:
    """What setup() checked and read: no process group, model or file of the run exists yet."""
    cfg: TrainConfig
    device_type: str
    tokenizer: object
    token_bytes: torch.Tensor
    core_tasks: list | None
    ckpt_dir: str
    folder: RunFolder
    resume_ckpt: dict | None
    init_ckpt: dict | None


@dataclass
class Trainer:
    """What the phases share, built once by build() and restore()."""
    cfg: TrainConfig                 # with the resolved depth and dtype: what config.json records
    hook: TrainHook
    setup: Setup
    device: torch.device
    ddp: bool
    rank: int
    world_size: int
    model_config: GPTConfig
    model: GPT
    muon: object
    adamw: object
    autocast: object
    num_iterations: int
    tokens_per_fwdbwd: int           # tokens of one micro-batch over all ranks
    grad_accum_steps: int
    eval_steps: int
    flops_per_token: float
    peak_flops: float | None
    stop: StopSignals
    health: Health
    wandb_run: object = None
    train_metrics: object = None     # train_metrics.jsonl
    # from restore(): the compiled (or plain) model that trains, the data, the first step of this process
    train_model: object = None
    train_loader: object = None
    train_iter: object = None
    start_step: int = 0
    init_info: dict | None = None    # the --init_from source, recorded in every checkpoint
    resumes: list = field(default_factory=list)  # each resume that changed a flag: its step and the old and new values
    # this process' raw per-step losses (returned for tests and reports) and step times (the estimate)
    losses: list = field(default_factory=list)
    step_times: list = field(default_factory=list)

    def log(self, data, step):
        if self.wandb_run is not None:
            self.wandb_run.log(data, step=step)


def train(cfg, hook=None, default_tag=None):
    """Train; `default_tag` names the run folder when --model_tag is empty ("{depth}" is filled in). The run
    folder's lock, taken in setup, is given back when the run ends, however it ends."""
    hook = hook or TrainHook()
    s = setup(cfg, default_tag)
    try:
        t = build(s, hook)
        state = restore(t)
        _loop(t, state)
        return finish(t, state)
    finally:
        s.folder.release()


def _loop(t, state):
    """evaluate, save, step until the horizon or a stop signal (which saves the last completed step)."""
    t.stop.install(t.setup.folder.kept)
    try:
        while True:
            evaluate(t, state)
            last_step = state.step == t.num_iterations
            if _save_due(t, state, last_step):
                save(t, state)
            if last_step:
                break
            t.stop.check()
            step(t, state)  # forward and backward, the hook's analysis, the optimizer update; state.step + 1
    except StopTraining:
        # the partial step, evaluation or analysis is dropped: the checkpoint describes the last completed step
        t.model.zero_grad(set_to_none=True)
        if t.setup.folder.saved_step != state.step:
            save(t, state)
        print0(f"Stopped by signal {t.stop.agreed} at step {state.step}; continue with --resume")
    finally:
        t.stop.restore()
        t.setup.folder.close()


# -- setup: every check and read that can fail, before anything is created or written ------------

def setup(cfg, default_tag):
    check_config(cfg)
    device_type = check_device_type(cfg.device_type)
    cfg = _resolve_depth(cfg, device_type)
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes()
    _check_data(cfg)
    # the CORE bundle is read now, so a missing one stops the run before any training
    core_tasks = load_bundle(max_per_task=cfg.core_metric_max_per_task) if cfg.core_metric_every > 0 else None
    ckpt_dir = checkpoint_dir(cfg.output_dir, cfg.model_tag or (default_tag or "d{depth}").format(depth=cfg.depth))
    folder = RunFolder(ckpt_dir, get_dist_info()[1])
    folder.claim()  # the lock, before anything reads the folder or decides about it
    init_ckpt = resume_ckpt = None
    try:
        if cfg.init_from and not cfg.resume:  # a resumed run's checkpoint already holds what --init_from gave it
            init_ckpt = _load_init(cfg.init_from, ckpt_dir,
                                   GPTConfig.from_depth(cfg.depth, tokenizer.get_vocab_size(), cfg.max_seq_len))
            if cfg.init_data == "continue":
                _check_continued_data(cfg, init_ckpt)
        if cfg.resume:
            resume_ckpt = load_checkpoint(os.path.join(ckpt_dir, CHECKPOINT_NAME))
        else:
            folder.check_fresh(cfg.overwrite)
    except BaseException:
        folder.release()
        raise
    return Setup(cfg, device_type, tokenizer, token_bytes, core_tasks, ckpt_dir, folder, resume_ckpt, init_ckpt)


def _resolve_depth(cfg, device_type):
    """--depth=-1: d20 on CUDA; on CPU and MPS a model size must be chosen (d20 would take days there)."""
    if cfg.depth != -1:
        return cfg
    if device_type != "cuda":
        raise UserError(f"--depth is required on {device_type}: the default (depth 20, about 560M parameters) is sized for "
                        f"GPUs; choose a small model, e.g. --depth=4 as in the Phase 1 guide")
    print0("Using --depth=20 (the default on CUDA)")
    return dataclasses.replace(cfg, depth=20)


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


def _check_continued_data(cfg, ckpt):
    """--init_data=continue: the source run read the same data in the same order on as many ranks, without replay,
    so its saved positions are positions in this run's stream."""
    theirs, world_size = ckpt["metadata"].get("train_config", {}), get_dist_info()[3]
    same_dir = os.path.realpath(get_data_dir(theirs.get("data_dir") or None)) == os.path.realpath(get_data_dir(cfg.data_dir or None))
    problems = [what for what, bad in (
        (f"read {theirs.get('data_dir') or 'the default data'}, not {cfg.data_dir or 'the default data'}", not same_dir),
        (f"used --data_seed={theirs.get('data_seed', -1)}, not {cfg.data_seed}", theirs.get("data_seed", -1) != cfg.data_seed),
        ("mixed in replay data", theirs.get("replay_fraction", 0) > 0),
        (f"ran on {ckpt['metadata'].get('world_size', 1)} rank(s), not {world_size}", ckpt["metadata"].get("world_size", 1) != world_size),
    ) if bad]
    if problems:
        raise UserError(f"--init_data=continue: the run of --init_from={cfg.init_from} {'; '.join(problems)}; continue from a "
                        f"run on the same data, or use --init_data=fresh")


# -- build: processes, model, optimizers, logger and hook ------------------------------------------

def build(s, hook):
    ddp, rank, _, world_size, device = compute_init(s.device_type)
    if ddp:
        print0(f"Distributed: {world_size} ranks, backend {dist.get_backend()}; gradients all-reduced before clipping, "
               f"optimizer state replicated")
    torch.manual_seed(s.cfg.seed)
    print_banner()
    saved_cfg = s.resume_ckpt["metadata"].get("train_config", {}) if s.resume_ckpt is not None else None
    dtype, why = resolve_dtype(s.cfg.dtype, s.device_type, saved_cfg)
    print0(f"Matmul dtype: {dtype} ({why})")
    cfg = dataclasses.replace(s.cfg, dtype=dtype)  # config.json and the checkpoint record the resolved dtype
    model_config = _model_config(cfg, s.tokenizer)
    tokens_per_fwdbwd, grad_accum_steps, eval_steps = _batch_split(cfg, world_size)
    model = _new_model(model_config, device, hook)
    _freeze(model, cfg.freeze)
    flops_per_token = model.estimate_flops()
    num_iterations = _resolve_horizon(cfg, model.num_params(), flops_per_token)
    muon, adamw = build_optimizers(model, cfg.matrix_lr, cfg.embedding_lr, cfg.unembedding_lr, cfg.weight_decay,
                                   ns_dtype=DTYPES[dtype])
    health = Health(model_config.vocab_size, round(cfg.warmup_ratio * num_iterations),
                    note=lambda: s.folder.kept(resume=False))
    print0(health.describe())
    t = Trainer(cfg, hook, s, device, ddp, rank, world_size, model_config, model, muon, adamw,
                autocast_for(s.device_type, dtype), num_iterations, tokens_per_fwdbwd, grad_accum_steps, eval_steps,
                flops_per_token, device_peak_flops(device), StopSignals(device, ddp), health)
    t.wandb_run = _init_wandb(cfg, rank == 0, s.ckpt_dir)
    hook.attach(Run(cfg, model, muon, adamw, device, s.ckpt_dir, t.log, rank, world_size, t.stop, s.folder))
    t.train_metrics = s.folder.jsonl(TRAIN_METRICS)
    return t


def _model_config(cfg, tokenizer):
    vocab_size = tokenizer.get_vocab_size()
    print0(f"Vocab size: {vocab_size:,}")
    model_config = GPTConfig.from_depth(cfg.depth, vocab_size, cfg.max_seq_len)
    print0(f"num_layers: {model_config.n_layer}")
    print0(f"model_dim: {model_config.n_embd}")
    print0(f"num_heads: {model_config.n_head}")
    print0(f"num_kv_heads: {model_config.n_kv_head}")
    return model_config


def _batch_split(cfg, world_size):
    """(tokens of one micro-batch over all ranks, micro-batches per step, batches per evaluation)."""
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
    return tokens_per_fwdbwd, grad_accum_steps, eval_steps


def _new_model(model_config, device, hook):
    """Built on the meta device and initialised in place on `device`; the hook swaps its layers."""
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    hook.prepare_model(model)
    print0(f"Number of parameters: {model.num_params():,}")
    print0(f"Estimated FLOPs per token: {model.estimate_flops():e}")
    return model


def frozen_parameters(model, freeze):
    """The parameters --freeze names: embedding = the token embedding, lm_head, blocks = every parameter of every block."""
    parts = {"embedding": [model.transformer.wte.weight], "lm_head": [model.lm_head.weight],
             "blocks": list(model.transformer.h.parameters())}
    return [p for name in _parts(freeze) for p in parts[name]]


def _freeze(model, freeze):
    """--freeze: no gradient, so the optimizers never touch them (Muon and AdamW skip a parameter without one)."""
    frozen = frozen_parameters(model, freeze)
    for p in frozen:
        p.requires_grad_(False)
    if frozen:
        print0(f"Frozen: {freeze} ({sum(p.numel() for p in frozen):,} parameters keep their starting values)")


def _resolve_horizon(cfg, num_params, flops_per_token):
    if cfg.num_iterations > 0:
        print0(f"Using user-provided number of iterations: {cfg.num_iterations:,}")
        n = cfg.num_iterations
    elif cfg.target_flops > 0:
        n = max(1, round(cfg.target_flops / (flops_per_token * cfg.total_batch_size)))
        print0(f"Calculated number of iterations from target FLOPs: {n:,}")
    else:
        n = max(1, (cfg.target_param_data_ratio * num_params) // cfg.total_batch_size)
        print0(f"Calculated number of iterations from target data:param ratio: {n:,}")
    print0(f"Total number of training tokens: {n * cfg.total_batch_size:,}")
    print0(f"Tokens : Params ratio: {n * cfg.total_batch_size / num_params:.2f}")
    print0(f"Total training FLOPs estimate: {flops_per_token * n * cfg.total_batch_size:e}")
    return n


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


# -- restore: the state to start from, and the training data at its position ------------------------

def restore(t):
    s = t.setup
    state = LoopState()
    if s.resume_ckpt is not None:
        state = _resume(t, s.resume_ckpt)
        print0(f"Resumed from {s.ckpt_dir} at step {state.step}")
        t.init_info = s.resume_ckpt["metadata"].get("init_from")
    elif s.init_ckpt is not None:
        t.init_info = _init_from(s.init_ckpt, t.cfg.init_from, t.model, t.muon, t.adamw)
        if t.cfg.init_data == "continue":  # checked in setup: the same data, order and ranks
            state.loader = s.init_ckpt["loop"]["dataloader"][t.rank]
            print0(f"Data: continuing where the run of --init_from stopped reading ({state.loader})")
    t.start_step = state.step
    use_compile = s.device_type == "cuda" if t.cfg.compile is None else t.cfg.compile
    t.train_model = torch.compile(t.model, dynamic=False) if use_compile else t.model
    t.train_loader = _train_loader(t, state.loader)
    t.train_iter = iter(t.train_loader)
    # every check has passed: from here on the run's files change
    s.folder.start(s.resume_ckpt, t.cfg.overwrite, {TRAIN_METRICS: state.step - 1} if state.pending_row else None)
    _print_plan(t, state.step)
    state.loader, state.rng = t.train_loader.state_dict(), _rng_state(t.device)
    return state


def _resume(t, ckpt):
    """The saved run's weights, hook state, optimizer state and RNG into this one, on the terms of
    nanochat.resume_terms (printed); returns its LoopState."""
    cfg, meta, step = t.cfg, ckpt["metadata"], ckpt["loop"]["step"]
    changes = resume_terms.check(meta.get("train_config", {}), cfg)
    resume_terms.check_horizon(step, t.num_iterations)
    if meta.get("world_size", 1) != t.world_size:
        raise UserError(f"--resume: the checkpoint was written by {meta['world_size']} ranks, this run has {t.world_size}")
    # checkpoints written before the key was neutral hold the hook's state under "adaptive"
    hook_state = ckpt.get("hook", ckpt.get("adaptive", {}))
    for line in resume_terms.describe(cfg, step, meta.get("num_iterations"), t.num_iterations, changes,
                                      f"{meta.get('run_kind')} state" if hook_state else ""):
        print0(line)
    changed = {k: list(v) for k, v in changes.items()}  # {flag: [the checkpoint's value, this run's]}
    if meta.get("num_iterations") != t.num_iterations:
        changed["horizon"] = [meta.get("num_iterations"), t.num_iterations]
    t.resumes = meta.get("resumes", []) + ([{"step": step, "changed": changed}] if changed else [])
    try:
        t.model.load_state_dict(ckpt["model"], strict=True)
        t.hook.load_state_dict(hook_state)
        t.muon.load_state_dict(ckpt["optim"]["muon"])
        t.adamw.load_state_dict(ckpt["optim"]["adamw"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"--resume: checkpoint does not match this model ({first_sentence(e)})") from None
    torch.set_rng_state(ckpt["rng"]["torch"])
    if t.device.type == "cuda" and ckpt["rng"]["cuda"].numel():
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], t.device)
    return LoopState.from_checkpoint(ckpt, t.rank)


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


def _train_loader(t, position):
    cfg, data_dir = t.cfg, t.cfg.data_dir or None
    if cfg.replay_fraction > 0:
        loader = ReplayLoader(t.setup.tokenizer, cfg.device_batch_size, cfg.max_seq_len, t.device, data_dir,
                              cfg.replay_data_dir, cfg.replay_fraction, cfg.seed, rank=t.rank, world_size=t.world_size,
                              state=position, data_seed=cfg.data_seed)
        print0(f"Replay: {cfg.replay_fraction:.1%} of the training sequences from {cfg.replay_data_dir}")
        return loader
    return DataLoader(t.setup.tokenizer, cfg.device_batch_size, cfg.max_seq_len, "train", t.device,
                      rank=t.rank, world_size=t.world_size, data_dir=data_dir, state=position, data_seed=cfg.data_seed)


def _print_plan(t, step):
    cfg, left = t.cfg, t.num_iterations - step
    every = f"every {cfg.eval_every:,} steps and at the end" if cfg.eval_every > 0 else "at the end"
    later = f"; a time estimate follows after {ESTIMATE_AFTER} steps" if left > ESTIMATE_AFTER else ""
    print0(f"Plan: {left:,} steps of {cfg.total_batch_size:,} tokens to go ({left * cfg.total_batch_size:,} tokens), "
           f"validation on {t.eval_steps * t.tokens_per_fwdbwd:,} tokens {every}{later}")


def _rng_state(device):
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0)}


# -- evaluate: what is due at this step, then the step's row of train_metrics.jsonl -----------------

def _due(every, step):
    return every > 0 and step % every == 0


def evaluate(t, state):
    cfg, step, last_step = t.cfg, state.step, state.step == t.num_iterations
    if (last_step or _due(cfg.eval_every, step)) and state.val_step != step:
        _validation(t, state)
    if (t.setup.core_tasks is not None and step > 0 and (last_step or _due(cfg.core_metric_every, step))
            and not (state.core and state.core["step"] == step)):  # a resumed run does not redo its last result
        state.core = _core_metric(t, step)
        state.pending_row = {**(state.pending_row or {"step": step}), "core_metric": state.core["core_metric"]}
    if state.pending_row is not None:
        t.train_metrics.write(state.pending_row)
        state.pending_row = None
    if t.rank == 0 and (last_step or (step > 0 and _due(cfg.sample_every, step))):
        _print_samples(t.model, t.setup.tokenizer, t.autocast)


def _validation(t, state):
    """Validation bpb (and on --extra_val_dir's val shard, the same weights and token budget)."""
    cfg, step = t.cfg, state.step
    dirs = {"val_bpb": cfg.data_dir or None, **({"extra_val_bpb": cfg.extra_val_dir} if cfg.extra_val_dir else {})}
    measured = {}
    t.model.eval()
    for key, data_dir in dirs.items():
        loader = DataLoader(t.setup.tokenizer, cfg.device_batch_size, cfg.max_seq_len, "val", t.device,
                            rank=t.rank, world_size=t.world_size, data_dir=data_dir)
        with t.autocast:
            measured[key] = evaluate_bpb(t.model, loader, t.eval_steps, t.setup.token_bytes, stop=t.stop)
    t.model.train()
    state.val_bpb, state.val_step = measured["val_bpb"], step
    state.min_val_bpb = min(state.min_val_bpb, state.val_bpb)
    print0(f"Step {step:05d} | Validation bpb: {state.val_bpb:.4f}")
    if cfg.extra_val_dir:
        print0(f"Step {step:05d} | Extra validation bpb: {measured['extra_val_bpb']:.4f} ({cfg.extra_val_dir})")
    t.log({"val/bpb": state.val_bpb, **({"val/extra_bpb": measured["extra_val_bpb"]} if cfg.extra_val_dir else {})}, step)
    state.pending_row = {**(state.pending_row or {"step": step}), **measured}


def _core_metric(t, step):
    """CORE on the uncompiled model (prompt lengths vary); every rank takes part."""
    t.model.eval()
    with t.autocast:
        out = evaluate_core(t.model, t.setup.tokenizer, t.device, tasks=t.setup.core_tasks, stop=t.stop)
    t.model.train()
    print0(f"Step {step:05d} | CORE metric: {out['core_metric']:.4f}")
    t.log({"core_metric": out["core_metric"], **{f"core/{label}": v for label, v in out["centered_results"].items()}}, step)
    return {"step": step, "core_metric": out["core_metric"], "centered_results": out["centered_results"],
            "results": out["results"]}


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


# -- step: one optimizer update ---------------------------------------------------------------------

def step(t, state):
    t0 = time.time()
    loss, grad_norm = (x.item() for x in _forward_backward(t))
    t.health.check(state.step + 1, loss, grad_norm)  # before the analysis and the update: a broken step is never applied
    # the method's analysis: final (reduced, clipped) gradients, before the optimizer moves the weights
    t.hook.after_backward(state.step + 1, state.step + 1 == t.num_iterations)
    lrm = _update(t, state.step)
    dt = time.time() - t0
    state.step += 1
    state.loader, state.rng = t.train_loader.state_dict(), _rng_state(t.device)
    _record(t, state, loss, grad_norm, lrm, dt)


def _forward_backward(t):
    """Every micro-batch of one step; returns (mean loss, gradient norm) with the gradients reduced over
    ranks and clipped."""
    micro_losses = []
    for micro in range(t.grad_accum_steps):
        if micro:
            t.stop.check()
        x, y = next(t.train_iter)
        with t.autocast:
            loss = t.train_model(x, y)
        micro_losses.append(loss.detach())
        (loss / t.grad_accum_steps).backward()
    # the step's loss is the mean over its micro-batches (and over ranks below), so N ranks and one
    # process with N times the accumulation report the same number
    train_loss = torch.stack(micro_losses).mean()
    if t.ddp:
        _all_reduce_grads(t.model, t.world_size)
        dist.all_reduce(train_loss)
        train_loss /= t.world_size
    trained = t.muon.params() + [p for g in t.adamw.param_groups for p in g["params"]]
    return train_loss, clip_gradients(t.model, t.cfg.grad_clip, trained)


def _update(t, step):
    """The optimizer update of step `step` (0-based) at the scheduled LR and momentum; returns the LR multiplier."""
    cfg = t.cfg
    lrm = lr_multiplier(step, t.num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
    for opt in (t.muon, t.adamw):
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    t.muon.param_groups[0]["momentum"] = muon_momentum(step)
    t.muon.step()
    t.adamw.step()
    t.model.zero_grad(set_to_none=True)
    if t.device.type == "cuda":
        torch.cuda.synchronize()  # dt measures the work, not its launch
    return lrm


def _record(t, state, loss, grad_norm, lrm, dt):
    """The finished step to the console, wandb and (as the pending row) train_metrics.jsonl."""
    cfg = t.cfg
    t.losses.append(loss)
    state.smooth_loss = EMA_BETA * state.smooth_loss + (1 - EMA_BETA) * loss
    debiased = state.smooth_loss / (1 - EMA_BETA ** state.step)
    state.total_time += dt
    tok_per_sec = int(cfg.total_batch_size / dt)
    flops = t.flops_per_token * cfg.total_batch_size / dt
    mfu = f"{100 * flops / (t.peak_flops * t.world_size):.2f}" if t.peak_flops else "n/a"
    print0(f"step {state.step:05d}/{t.num_iterations:05d} ({100 * state.step / t.num_iterations:.2f}%) | loss: {debiased:.6f} | "
           f"grad norm: {grad_norm:.4f} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu} | "
           f"total time: {state.total_time / 60:.2f}m")
    t.log({"train/loss": debiased, "train/grad_norm": grad_norm, "train/lrm": lrm, "train/dt": dt,
           "train/tok_per_sec": tok_per_sec}, state.step)
    state.pending_row = {"step": state.step, "loss": debiased, "raw_loss": loss, "grad_norm": grad_norm, "lrm": lrm,
                         "dt": dt, "tok_per_sec": tok_per_sec, "total_time": state.total_time}
    t.step_times.append(dt)
    if len(t.step_times) == ESTIMATE_AFTER and state.step < t.num_iterations:
        _print_estimate(t.step_times, t.num_iterations - state.step)


def lr_multiplier(it, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def clip_gradients(model, max_norm, trained=None):
    """Global-norm clipping over the `trained` parameters (default: all), rescaling every gradient of the
    model, only when the norm exceeds max_norm (0 = never)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # a low-rank layer's frozen weight carries dL/dW_eff for the analysis: scaled with the rest, not counted twice
    counted = grads if trained is None else [p.grad for p in trained if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(counted)
    if max_norm > 0 and norm.item() > max_norm:  # the usual unconditional multiply is a pass over every gradient
        torch._foreach_mul_(grads, max_norm / (norm.item() + 1e-6))
    return norm


def _all_reduce_grads(model, world_size):
    """Average gradients over ranks in place."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # every reduction in flight at once, on the gradients themselves: a flat copy would write and read
    # the whole gradient once more every step
    for work in [dist.all_reduce(g, async_op=True) for g in grads]:
        work.wait()
    torch._foreach_div_(grads, world_size)


def _print_estimate(step_times, steps_left):
    """The cost of the rest of the run on this device, from the median of this process's first steps."""
    per_step = sorted(step_times)[len(step_times) // 2]
    total = per_step * steps_left
    took = f"{total:.0f} s" if total < 60 else f"{total / 60:.1f} min" if total < 3600 else f"{total / 3600:.1f} h"
    print0(f"Estimated time for the remaining {steps_left:,} steps: {took} at {per_step * 1000:.0f} ms/step "
           f"(median of the first {len(step_times)}; evaluations and saves come on top)")


# -- save: the checkpoint of the last completed step ------------------------------------------------

def _save_due(t, state, last_step):
    periodic = t.cfg.save_every > 0 and state.step > t.start_step and state.step % t.cfg.save_every == 0
    return (last_step or periodic) and t.setup.folder.saved_step != state.step


def save(t, state):
    """checkpoint.pt and config.json of state.step, written by rank 0; every rank learns whether it worked.
    Not while the health rules see a collapse coming, and never interrupted by a signal."""
    blocker = t.health.save_blocker()
    if blocker:  # the last good checkpoint stays
        if state.step == t.num_iterations:
            raise Diverged(f"training collapsed at its last step {state.step}: {blocker}; the step was not saved; "
                           f"{t.setup.folder.kept(resume=False)}")
        print0(f"Not saving step {state.step}: {blocker}")
        return
    with t.stop.saving():
        _write(t, state)


def _write(t, state):
    loaders = [state.loader]
    if t.ddp:
        loaders = [None] * t.world_size
        dist.all_gather_object(loaders, state.loader)
    hook_state = t.hook.state_dict()  # on every rank: a hook may gather its state
    failure = None
    if t.rank == 0:
        try:
            save_checkpoint(t.setup.ckpt_dir, _checkpoint(t, state, loaders, hook_state), _summary(t, state))
        except (WriteFailed, Diverged) as e:  # Diverged: non-finite weights, refused
            failure = t.setup.folder.failed(e)
    if t.ddp:  # every rank learns whether the save worked, so none waits for a rank that stopped
        ok = torch.tensor(0 if failure else 1, device=t.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item() and failure is None:
            raise UserError("rank 0 could not write the checkpoint (see its error)")
    if failure:
        raise failure
    t.setup.folder.saved_step = state.step
    print0(f"Saved checkpoint to {t.setup.ckpt_dir} (step {state.step})")


def _checkpoint(t, state, loaders, hook_state):
    metadata = {"model_config": t.model_config.to_dict(), "step": state.step, "val_bpb": state.val_bpb,
                "train_config": dataclasses.asdict(t.cfg), "num_iterations": t.num_iterations, "run_kind": t.hook.name,
                "world_size": t.world_size, "core": state.core, "init_from": t.init_info, "resumes": t.resumes}
    return {"model": t.model.state_dict(), "metadata": metadata,
            "optim": {"muon": t.muon.state_dict(), "adamw": t.adamw.state_dict()},
            "loop": state.to_checkpoint(loaders), "rng": state.rng, "hook": hook_state}


def _summary(t, state):
    """config.json: the readable record of the run at this save."""
    return {"model_config": t.model_config.to_dict(), "train_config": dataclasses.asdict(t.cfg), "step": state.step,
            "num_iterations": t.num_iterations, "val_bpb": state.val_bpb,
            "min_val_bpb": state.min_val_bpb if math.isfinite(state.min_val_bpb) else None,
            "run_kind": t.hook.name, "hook": t.hook.summary(),
            "core_metric": state.core["core_metric"] if state.core else None, "core": state.core, "init_from": t.init_info,
            "resumes": t.resumes}


# -- finish ---------------------------------------------------------------------------------------

def finish(t, state):
    """The closing lines; returns what tests and reports read of the run."""
    if t.cfg.replay_fraction > 0:
        print0(f"Replay: {t.train_loader.replayed:,} of {t.train_loader.sequences:,} training sequences on rank {t.rank} "
               f"came from {t.cfg.replay_data_dir}")
    print0(f"Peak memory usage: {peak_memory_mib(t.setup.device_type):.2f} MiB")
    print0(f"Total training time: {state.total_time / 60:.2f}m")
    print0(f"Minimum validation bpb: {state.min_val_bpb:.4f}")
    if t.wandb_run is not None:
        t.wandb_run.summary["min_val_bpb"] = state.min_val_bpb
        t.wandb_run.finish()
    compute_cleanup()
    return {"step": state.step, "min_val_bpb": state.min_val_bpb, "val_bpb": state.val_bpb, "ckpt_dir": t.setup.ckpt_dir,
            "total_time": state.total_time, "num_iterations": t.num_iterations, "losses": t.losses,
            "stopped_by_signal": t.stop.agreed, "core_metric": state.core["core_metric"] if state.core else None}
