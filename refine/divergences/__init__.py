"""Divergences between the generator's and the teacher's distributions; one file each."""

from refine.divergences.base import Divergence
from refine.divergences.di import DiffInstruct

DIVERGENCES = {cls.name: cls for cls in [DiffInstruct]}

def make_divergence(name, **kwargs):
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{name}' (choose from {', '.join(sorted(DIVERGENCES))})")
    return DIVERGENCES[name](**kwargs)
