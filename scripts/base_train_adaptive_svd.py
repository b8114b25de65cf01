"""Pretraining with adaptive SVD: the baseline loop plus the SVD analysis hook.

Every --svd_interval steps (and at the last step) each target matrix is analysed: do its gradient
and its applied update concentrate on the directions it has already learned (clobbering risk,
measured against the random baseline)? Layers switch between full-matrix training and low-rank
training of their minor singular subspace. Phase 1 of the researcher's guide:

  python -m scripts.base_train_adaptive_svd --depth=4 --max_seq_len=512 --device_batch_size=1 \\
      --eval_tokens=512 --core_metric_every=-1 --total_batch_size=512 --num_iterations=100 --device_type=cpu

Checkpoints and svd_metrics.jsonl go to <output_dir>/base_checkpoints/d<depth>/.
Method, metrics and every threshold flag: experiments/ADAPTIVE_SVD_METHOD.md.
Exit status: 0 finished; 128 + n stopped by signal n after saving (continue with --resume;
0 under torchrun); 2 bad input or a refused start; 3 the run diverged or collapsed.
"""

from nanochat.adaptive_cycle import AdaptiveConfig, AdaptiveSVDHook
from nanochat.cli import parse_args
from nanochat.common import get_dist_info, run_cli
from nanochat.stopping import exit_status
from nanochat.train import train


def main(argv):
    cfg = parse_args(AdaptiveConfig, argv, prog="python -m scripts.base_train_adaptive_svd", description=__doc__)
    hook = AdaptiveSVDHook(cfg) if cfg.adaptive_svd else None
    result = train(cfg, hook=hook, default_tag="d{depth}" if cfg.adaptive_svd else "d{depth}_baseline")
    return exit_status(result["stopped_by_signal"], get_dist_info()[0])


if __name__ == "__main__":
    run_cli(main)
