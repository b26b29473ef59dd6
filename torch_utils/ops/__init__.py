"""Pure-PyTorch implementations of the ops that NVlabs-style network sources import."""
