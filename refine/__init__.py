"""Data-free refinement of one-step generators against diffusion teachers: teachers, generators,
divergences and the refinement loop."""
