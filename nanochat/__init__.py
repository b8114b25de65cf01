"""nanochat-style GPT pretraining with adaptive SVD training."""
