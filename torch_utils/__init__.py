"""PyTorch helpers: pickle persistence, misc utilities and the custom ops used by the networks."""
