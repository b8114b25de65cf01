"""Baseline pretraining of a nanochat-style GPT (no adaptive SVD), on the shared training loop.

Example (CPU, a few minutes):
  python -m scripts.base_train --depth=4 --max_seq_len=512 --device_batch_size=1 \\
      --total_batch_size=512 --num_iterations=100 --eval_tokens=512 --device_type=cpu
Checkpoints go to <output_dir>/base_checkpoints/d<depth>_baseline/ unless --model_tag is given.
Exit status: 0 finished; 128 + n stopped by signal n after saving (continue with --resume;
0 under torchrun); 2 bad input or a refused start; 3 the run diverged or collapsed.
"""

from nanochat.cli import parse_args
from nanochat.common import get_dist_info, run_cli
from nanochat.stopping import exit_status
from nanochat.train import TrainConfig, train


def main(argv):
    cfg = parse_args(TrainConfig, argv, prog="python -m scripts.base_train", description=__doc__)
    result = train(cfg, default_tag="d{depth}_baseline")
    return exit_status(result["stopped_by_signal"], get_dist_info()[0])


if __name__ == "__main__":
    run_cli(main)
