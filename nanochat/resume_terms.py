"""What a resumed run takes from its checkpoint and what from the command line.

Every training flag (TrainConfig, AdaptiveConfig and the adaptive-SVD policy) has one class, declared here:
- MUST_MATCH: it shapes the trajectory that --resume continues exactly (model, batch, optimizer settings,
  whose learning rates and weight decay live in the checkpoint's optimizer state, the LR-schedule shape,
  the data mix and order, seed, dtype, what is frozen, the method and its thresholds). A value other than
  the checkpoint's stops the resume in one line naming the flags; a new trajectory from the same weights
  is --init_from.
- MAY_CHANGE: it takes effect from the resumed step on: the horizon (its LR schedule changes from
  there; it may not end before the checkpoint's step), the evaluation, sample and save cadence and the
  evaluation size, where files are, the device, compilation, the wandb name.
- RUN_MODE: how this process starts (--resume, --overwrite), not part of the run.
config.json and the checkpoint record the values in effect; `changes` lists what a resume changed,
for the record of what ran.
"""

import dataclasses

from nanochat.adaptive_svd import SVDPolicy
from nanochat.common import UserError

MUST_MATCH, MAY_CHANGE, RUN_MODE = "must match", "may change", "run mode"

TERMS = {
    "depth": MUST_MATCH, "max_seq_len": MUST_MATCH, "device_batch_size": MUST_MATCH, "total_batch_size": MUST_MATCH,
    "embedding_lr": MUST_MATCH, "unembedding_lr": MUST_MATCH, "matrix_lr": MUST_MATCH, "weight_decay": MUST_MATCH,
    "grad_clip": MUST_MATCH, "warmup_ratio": MUST_MATCH, "warmdown_ratio": MUST_MATCH, "final_lr_frac": MUST_MATCH,
    "replay_data_dir": MUST_MATCH, "replay_fraction": MUST_MATCH, "init_from": MUST_MATCH, "dtype": MUST_MATCH,
    "seed": MUST_MATCH, "init_data": MUST_MATCH, "data_seed": MUST_MATCH, "freeze": MUST_MATCH,
    "num_iterations": MAY_CHANGE, "target_flops": MAY_CHANGE, "target_param_data_ratio": MAY_CHANGE,
    "eval_every": MAY_CHANGE, "eval_tokens": MAY_CHANGE, "core_metric_every": MAY_CHANGE,
    "core_metric_max_per_task": MAY_CHANGE, "sample_every": MAY_CHANGE, "save_every": MAY_CHANGE,
    "model_tag": MAY_CHANGE, "output_dir": MAY_CHANGE, "data_dir": MAY_CHANGE, "extra_val_dir": MAY_CHANGE,
    "device_type": MAY_CHANGE, "compile": MAY_CHANGE, "run": MAY_CHANGE,
    "resume": RUN_MODE, "overwrite": RUN_MODE,
    # the adaptive-SVD method: which layers, how often and how it analyses them decide every switch
    "adaptive_svd": MUST_MATCH, "adaptive_svd_target_layer": MUST_MATCH, "svd_targets": MUST_MATCH,
    "svd_interval": MUST_MATCH, "svd_method": MUST_MATCH, "svd_embed_frac": MUST_MATCH,
    **{f.name: MUST_MATCH for f in dataclasses.fields(SVDPolicy)},  # every threshold of the rule table
}
OPTIMIZER_SETTINGS = ("matrix_lr", "embedding_lr", "unembedding_lr", "weight_decay")


def check(saved, cfg):
    """Compare this run's config with the checkpoint's train_config (`saved`, a dict). Raises UserError
    naming every MUST_MATCH flag that differs; returns {flag: (saved value, new value)} of the MAY_CHANGE
    flags that differ. Flags the checkpoint does not know (it predates them) are not compared."""
    values = dataclasses.asdict(cfg)
    differ = {k: (saved[k], v) for k, v in values.items() if k in saved and saved[k] != v and TERMS[k] != RUN_MODE}
    refused = [k for k in differ if TERMS[k] == MUST_MATCH]
    if refused:
        was = " and ".join(f"--{k}={differ[k][0]}, not {differ[k][1]}" for k in refused)
        where = (" (the learning rates and weight decay are part of the checkpoint's optimizer state)"
                 if set(refused) & set(OPTIMIZER_SETTINGS) else "")
        raise UserError(f"--resume: the checkpoint was trained with {was}{where}; a resumed run continues the saved run "
                        f"exactly, so give the checkpoint's values, or start a new run from its weights with "
                        f"--init_from=<its checkpoint.pt> and another --model_tag")
    return {k: v for k, v in differ.items() if TERMS[k] == MAY_CHANGE}


def check_horizon(step, num_iterations):
    if num_iterations < step:
        raise UserError(f"--resume: the checkpoint is at step {step}, after the end of a {num_iterations}-step run; give "
                        f"--num_iterations >= {step} (or the horizon flags the run was started with)")


def describe(cfg, step, saved_horizon, num_iterations, changes, hook_state):
    """The lines printed at a resume: what comes from the checkpoint, what from the command line."""
    rates = ", ".join(f"{k}={getattr(cfg, k)}" for k in OPTIMIZER_SETTINGS)
    lines = [f"Resume at step {step}: from the checkpoint: weights, optimizer state ({rates}, Muon momentum, AdamW "
             f"moments), LR-schedule position, data position, RNG state" + (f", {hook_state}" if hook_state else "")
             + f"; {sum(t == MUST_MATCH for t in TERMS.values())} flags that shape the run checked equal to its own"]
    changed = [f"--{k}={new} (was {old})" for k, (old, new) in changes.items()]
    if num_iterations != saved_horizon:
        changed.append(f"the horizon is {num_iterations} steps (was {saved_horizon}): the LR schedule changes from here")
    lines.append("Resume: from the command line, in effect from here: " + ("; ".join(changed) if changed else "no changes"))
    return lines
