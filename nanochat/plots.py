"""Figures of runs, from their files: one run (loss and bpb, modes and ranks, the detector's ratios,
subspaces, spectra) and the forgetting experiment's (curves, Pareto, dose-response, detector). Used by
scripts.plot_svd, scripts.compare_runs, scripts.forgetting and scripts.rebuild_evidence.

matplotlib is the optional `plots` extra: it is imported when a figure is drawn, not with this module.
"""

import math
import os

from nanochat.adaptive_svd import Action, Mode
from nanochat.checkpoint_manager import CHECKPOINT_NAME
from nanochat.common import UserError
from nanochat.runs import LAYER_TYPES, evaluations, layer_records, run_settings, step_rows, svd_records

DPI = 90


def pyplot():
    """matplotlib.pyplot drawing to files (no display needed); a UserError when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib is not installed; install the plots extra (pip install -e '.[plots]'), "
                        "or run without figures") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(n, title, sharey=False):
    plt = pyplot()
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.3 * nrows + 0.6), squeeze=False, sharex=True, sharey=sharey)
    fig.suptitle(title)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _short(layer):
    return layer.replace("block", "b").replace(".attn.", ".").replace(".mlp.", ".mlp.")


def _save(fig, path):
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _series(recs, key):
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_loss(runs, path):
    """runs: [(label, per-step rows)]."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    losses = []
    for label, rows in runs:
        steps, loss = _series(rows, "loss")
        losses += loss
        if steps:
            a1.plot(steps, loss, label=label, lw=1)
        vals = evaluations(rows)
        if vals:
            a2.plot([s for s, _ in vals], [v for _, v in vals], marker="o", ms=3, label=label)
    a1.set(xlabel="step", ylabel="training loss (EMA, nats)", title="training loss")
    a2.set(xlabel="step", ylabel="val bits per byte", title="validation bpb")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend()
    if losses:
        a1.set_ylim(min(losses) - 0.2, min(losses) + 3.0)
    return _save(fig, path)


def plot_mode_rank(layers, path):
    fig, axes = _grid(len(layers), "rank r after each analysis (shaded: low-rank mode; ^ to low-rank, v to full)")
    for ax, (name, recs) in zip(axes, layers.items()):
        steps, r = _series(recs, "r_after")
        ax.plot(steps, r, lw=1.2, color="C0")
        for rec in recs:
            if rec["mode_after"] == Mode.LOWRANK:
                ax.axvspan(rec["step"] - 0.5 * _interval(recs), rec["step"] + 0.5 * _interval(recs), color="C1", alpha=0.15, lw=0)
            if rec["action"] == Action.TO_LOWRANK:
                ax.plot(rec["step"], rec["r_after"], "^", color="C3", ms=5)
            elif rec["action"] == Action.TO_FULL:
                ax.plot(rec["step"], rec["r_after"], "v", color="k", ms=5)
        g = min(recs[0]["shape"])
        ax.set_ylim(0, g)
        ax.set_title(_short(name), fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _interval(recs):
    steps = sorted({r["step"] for r in recs})
    return min((b - a for a, b in zip(steps, steps[1:])), default=1)


def plot_alignment_ratio(layers, path):
    fig, axes = _grid(len(layers), "alignment ratio p^2/(k/n_out): gradient and update (random = 1; the decision reads "
                                   "the gradient's p-value, alignment_p.png)", sharey=True)
    for ax, (name, recs) in zip(axes, layers.items()):
        ax.plot(*_series(recs, "alignment_ratio"), lw=1.2, label="gradient")
        ax.plot(*_series(recs, "update_alignment_ratio"), lw=1.2, label="update dW")
        ax.axhline(1.0, color="gray", ls="--", lw=1, label="random")
        ax.set_title(_short(name), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_alignment_p(layers, thresholds, path):
    """The entry test: the gradient's alignment p-value per analysis, with the run's svd_alpha (enter
    at or below) and svd_exit_p (leave at or above)."""
    alpha, exit_p = thresholds
    fig, axes = _grid(len(layers), f"gradient alignment p-value under the null (enter <= {alpha}, leave >= {exit_p})",
                      sharey=True)
    for ax, (name, recs) in zip(axes, layers.items()):
        ax.semilogy(*_series(recs, "alignment_p"), lw=1.2, marker=".", label="alignment_p")
        if alpha is not None:
            ax.axhline(alpha, color="C3", ls=":", lw=1.2, label="svd_alpha")
        if exit_p is not None:
            ax.axhline(exit_p, color="C2", ls=":", lw=1.2, label="svd_exit_p")
        ax.set_title(_short(name), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_principal_alignment(layers, path):
    fig, axes = _grid(len(layers), "principal alignment ||U_k^T G||/||G|| (previous analysis' basis) vs its random baseline sqrt(k/n_out)", sharey=True)
    for ax, (name, recs) in zip(axes, layers.items()):
        ax.plot(*_series(recs, "principal_alignment"), lw=1.2, label="gradient")
        ax.plot(*_series(recs, "update_principal_alignment"), lw=1.0, alpha=0.8, label="update dW")
        pts = [(r["step"], math.sqrt(r["k_prev"] / r["shape"][0])) for r in recs if isinstance(r.get("k_prev"), int)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="gray", ls="--", lw=1, label="random sqrt(k/n_out)")
        ax.set_ylim(0, 1.02)
        ax.set_title(_short(name), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_subspace(layers, path):
    fig, axes = _grid(len(layers), "principal subspace overlap with the previous analysis, and reconstruction error at r", sharey=True)
    for ax, (name, recs) in zip(axes, layers.items()):
        ax.plot(*_series(recs, "subspace_overlap"), lw=1.2, label="overlap (mean cos^2)")
        ax.plot(*_series(recs, "subspace_overlap_above_chance"), lw=1.0, label="overlap above chance")
        ax.plot(*_series(recs, "reconstruction_error"), lw=1.2, label="reconstruction error")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(_short(name), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _spectra_of(run_dir):
    """{layer display name: (S at step 0, S at the checkpoint)} for the analysed layers of a run folder."""
    import torch

    from nanochat.checkpoint_manager import load_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    ckpt = load_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME))
    meta = ckpt["metadata"]
    torch.manual_seed(meta["train_config"]["seed"])  # the same init the run started from
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["model_config"]))
    model.to_empty(device="cpu")
    model.init_weights()
    init = model.state_dict()
    out = {}
    for key, W in ckpt["model"].items():
        if W.ndim == 2 and key.startswith("transformer.h."):
            parts = key.split(".")  # transformer.h.<b>.<attn|mlp>.<name>.weight
            name = f"block{parts[2]}.{parts[3]}.{parts[4]}"
            out[name] = (torch.linalg.svdvals(init[key].float()).numpy(), torch.linalg.svdvals(W.float()).numpy())
    return out, meta["step"]


def plot_spectra(run_dir, baseline_dir, layer_names, path):
    mine, step = _spectra_of(run_dir)
    base = _spectra_of(baseline_dir)[0] if baseline_dir else {}
    names = [n for n in layer_names if n in mine] or list(mine)
    fig, axes = _grid(len(names), f"singular values (log scale) at step 0 and step {step}")
    for ax, name in zip(axes, names):
        s0, s1 = mine[name]
        if s0.max() > 0:
            ax.semilogy(s0, color="gray", ls="--", lw=1, label="step 0")
        ax.semilogy(s1, lw=1.3, label=f"this run, step {step}")
        if name in base:
            ax.semilogy(base[name][1], lw=1.1, alpha=0.8, label=f"baseline, step {step}")
        ax.set_title(_short(name), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _arm_colors(data):
    """A fixed colour per arm, in the order the experiment lists them (baseline black)."""
    arms = [a for a in data["arm_info"] if a != "baseline"]
    plt = pyplot()
    cmap = plt.get_cmap("tab20")
    return {"baseline": "k", **{a: cmap(i % 20) for i, a in enumerate(arms)}}


def _mean_curve(curves):
    """Pointwise mean of [(xs, ys)] over the x values every curve has."""
    common = sorted(set.intersection(*(set(xs) for xs, _ in curves)))
    by = [dict(zip(xs, ys)) for xs, ys in curves]
    return common, [sum(d[x] for d in by) / len(by) for x in common]


def _half(iv):
    """The half-width of a t-interval (0 without one)."""
    return 0.0 if iv is None or iv.get("hi") is None else iv["hi"] - iv["mean"]


def _groups(data):
    """{group: [arms]} of the experiment's run arms but baseline (drawn in every group's panel)."""
    groups = {}
    for a, info in data["arm_info"].items():
        if a != "baseline" and not info["derived"]:
            groups.setdefault(info["group"], []).append(a)
    return groups


def plot_forgetting_curves(data, path):
    """Per group of arms (one row): A's and B's val bpb during phase B, the mean over seeds, next to the baseline."""
    plt = pyplot()
    groups = _groups(data)
    colors = _arm_colors(data)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 2.6 * len(groups) + 0.6), squeeze=False, sharex=True)
    fig.suptitle("A's bpb (forgetting: up is worse) and B's bpb (learning: down is better) during phase B; mean over seeds")
    for row, (group, arms) in zip(axes, groups.items()):
        for arm in ["baseline"] + arms:
            runs = [r for r in data["results"] if r["arm"] == arm]
            for ax, key in ((row[0], "A_val_bpb"), (row[1], "B_val_bpb")):
                curves = [([c["step"] for c in r["curve"]], [c[key] for c in r["curve"]]) for r in runs]
                ax.plot(*_mean_curve(curves), color=colors[arm], lw=1.6, marker="o", ms=2.5, label=f"{arm} ({len(runs)})")
        row[0].set_ylabel(f"{group}\nval bpb on A")
        row[1].set_ylabel("val bpb on B")
        for ax in row:
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("steps of phase B")
    return _save(fig, path)


def plot_pareto(data, path):
    """Every arm's forgetting against its final B bpb: one faint point per seed, the mean with its 95% t-interval on
    both axes; the freeze arms (the bounds of protection) as squares, replay as triangles."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.4, 5.4))
    colors = _arm_colors(data)
    for arm, info in data["arm_info"].items():
        if info["control"]:
            continue  # A -> A: its "B" is A
        runs = [r for r in data["results"] if r["arm"] == arm]
        ax.scatter([r["b_bpb_after"] for r in runs], [r["forgetting"] for r in runs], color=colors[arm], s=10, alpha=0.4)
        st = data["stats"][arm]
        f, b = st["forgetting"], st["b_bpb_after"]
        marker = "D" if arm == "baseline" else "s" if arm.startswith("freeze") else "^" if "replay" in arm else "o"
        ax.errorbar(b["mean"], f["mean"], xerr=_half(b), yerr=_half(f), color=colors[arm], marker=marker, ms=7, mec="k",
                    capsize=3, lw=1, label=f"{arm} ({f['n']})")
    ax.set(xlabel="final val bpb on B (lower is better)", ylabel="forgetting: rise of A's val bpb during B (lower is better)",
           title="forgetting vs learning B: mean and 95% interval over seeds per arm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_dose(data, path):
    """Forgetting and the B-bpb cost, relative to baseline with the relative 95% interval, against the protected
    fraction of g, for the block matrices and for the embedding and lm_head."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, group in enumerate(("dose_blocks", "dose_embed")):
        arms = [a for a, info in data["arm_info"].items() if info["group"] == group]
        if not arms:
            continue
        fracs = [data["arm_info"][a]["dose"] for a in arms]
        for ax, key in ((a1, "diff_forgetting"), (a2, "diff_b_bpb_after")):
            # no relative value where baseline's mean is not positive (a baseline that does not forget)
            pts = [(f, data["stats"][a][key]["relative"]) for f, a in zip(fracs, arms)
                   if data["stats"][a][key]["relative"]["mean"] is not None]
            err = [[100 * (r["mean"] - r["lo"]) if r["lo"] is not None else 0 for _, r in pts],
                   [100 * (r["hi"] - r["mean"]) if r["hi"] is not None else 0 for _, r in pts]]
            ax.errorbar([f for f, _ in pts], [100 * r["mean"] for _, r in pts], yerr=err, marker="o", capsize=3,
                        color=f"C{i}", label=group.replace("dose_", ""))
    a1.axhline(-100 * data["target"]["forgetting_drop"], color="C3", ls=":", label="target")
    a2.axhline(100 * data["target"]["b_bpb_rise_limit"], color="C3", ls=":", label="cost limit (upper bound)")
    a1.set(xlabel="protected fraction of g", ylabel="forgetting vs baseline (%)", title="forgetting (down is better)")
    a2.set(xlabel="protected fraction of g", ylabel="final B bpb vs baseline (%)", title="cost of learning B")
    for ax in (a1, a2):
        ax.axhline(0, color="gray", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_detector_shares(data, path):
    """Each detector's share of flagged layer-analyses during A -> B and A -> A, mean with its 95% t-interval."""
    plt = pyplot()
    entries = [(f"{name}\n({ref})", e) for name, refs in data["detector"].items() for ref, e in refs.items()]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(entries)), 4.2))
    for j, (arm, label) in enumerate((("baseline", "A -> B (baseline)"), ("control", "A -> A (control)"))):
        xs = [i + (j - 0.5) * 0.35 for i in range(len(entries))]
        ivs = [e[arm] for _, e in entries]
        ax.bar(xs, [iv["mean"] if iv else 0 for iv in ivs], width=0.35, yerr=[_half(iv) for iv in ivs], capsize=3,
               color=f"C{j}", label=label)
    ax.set_xticks(range(len(entries)), [label for label, _ in entries], fontsize=7)
    ax.set(ylabel="share of layer-analyses flagged", title="does the detector see the domain shift? (95% intervals)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_detector(data, path):
    """Per observing or detecting arm (row): A's bpb during B, then the gradient and the update alignment ratio per
    layer type against the previous analysis' basis (mean over blocks and seeds)."""
    plt = pyplot()
    arms = [a for a, info in data["arm_info"].items() if info["group"] in ("reference", "detector", "control")]
    fig, axes = plt.subplots(len(arms), 3, figsize=(14, 2.6 * len(arms) + 0.6), squeeze=False, sharex=True)
    fig.suptitle("where the detector stands during B: A's bpb next to the alignment ratios per layer type "
                 "(mean over blocks and seeds; random = 1)")
    for row, arm in zip(axes, arms):
        runs = [r for r in data["results"] if r["arm"] == arm]
        curves = [([c["step"] for c in r["curve"]], [c["A_val_bpb"] for c in r["curve"]]) for r in runs]
        row[0].plot(*_mean_curve(curves), color="k", marker="o", ms=3)
        row[0].set(ylabel=f"{arm}\nA's val bpb")
        for ax, key, title in ((row[1], "alignment_ratio", "gradient alignment ratio"),
                               (row[2], "update_alignment_ratio", "update alignment ratio")):
            for i, (t, label) in enumerate(LAYER_TYPES.items()):
                series = []
                for r in runs:
                    pts = [(p["step"], p[key]) for p in r["detector"].get(t, []) if p[key] is not None]
                    if pts:
                        series.append(([p[0] for p in pts], [p[1] for p in pts]))
                if series:
                    ax.plot(*_mean_curve(series), color=f"C{i}", lw=1.2, label=label)
            ax.axhline(1.0, color="gray", ls="--", lw=1)
            ax.set_title(title, fontsize=9)
        for ax in row:
            ax.grid(alpha=0.3)
    if axes[0][1].get_legend_handles_labels()[0]:  # no curve when no analysis had a reading (k = 0 everywhere)
        axes[0][1].legend(fontsize=7, ncol=2)
    for ax in axes[-1]:
        ax.set_xlabel("steps of phase B")
    return _save(fig, path)


def forgetting_figures(data, out, prefix=""):
    """The forgetting experiment's figures from its report data (nanochat.forgetting.tabulate); returns the paths."""
    pyplot()  # no matplotlib: say so before anything is written
    os.makedirs(out, exist_ok=True)
    written = [plot_forgetting_curves(data, os.path.join(out, prefix + "curves.png")),
               plot_pareto(data, os.path.join(out, prefix + "pareto.png")),
               plot_detector(data, os.path.join(out, prefix + "detector.png"))]
    if any(info["dose"] is not None for info in data["arm_info"].values()):
        written.append(plot_dose(data, os.path.join(out, prefix + "dose.png")))
    if data.get("detector"):
        written.append(plot_detector_shares(data, os.path.join(out, prefix + "detector_shares.png")))
    return written


def make_figures(run_dir, out, baseline=None, spectra=False, prefix=""):
    """All figures of one run; returns the paths written. Works while the run is still writing."""
    pyplot()  # no matplotlib: say so before anything is written
    runs = [("adaptive" if baseline else os.path.basename(os.path.normpath(run_dir)), step_rows(run_dir))]
    if baseline:
        runs.insert(0, ("baseline", step_rows(baseline)))
    os.makedirs(out, exist_ok=True)
    written = []
    if any(rows for _, rows in runs):
        written.append(plot_loss(runs, os.path.join(out, prefix + "loss_bpb.png")))
    layers = layer_records(svd_records(run_dir))
    if layers:
        settings, _ = run_settings(run_dir)
        thresholds = (settings.get("svd_alpha"), settings.get("svd_exit_p")) if settings else (None, None)
        written.append(plot_mode_rank(layers, os.path.join(out, prefix + "mode_rank.png")))
        written.append(plot_alignment_ratio(layers, os.path.join(out, prefix + "alignment_ratio.png")))
        written.append(plot_alignment_p(layers, thresholds, os.path.join(out, prefix + "alignment_p.png")))
        written.append(plot_principal_alignment(layers, os.path.join(out, prefix + "principal_alignment.png")))
        written.append(plot_subspace(layers, os.path.join(out, prefix + "subspace.png")))
    if spectra and os.path.exists(os.path.join(run_dir, CHECKPOINT_NAME)):
        written.append(plot_spectra(run_dir, baseline, list(layers), os.path.join(out, prefix + "spectra.png")))
    return written
