"""Networks, datasets, the EDM sampler and teacher training (train.py's library side)."""
