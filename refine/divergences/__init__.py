"""Divergences between the generator's and the teacher's distributions; one file each."""

import inspect

from refine.divergences.base import Divergence
from refine.divergences.di import DiffInstruct
from refine.divergences.dmd import DistributionMatching
from refine.divergences.fdiv import FDivergence
from refine.divergences.sid import ScoreIdentity
from refine.divergences.sim import ScoreImplicitMatching
from refine.divergences.vardiu import VarDiU

DIVERGENCES = {cls.name: cls for cls in [DiffInstruct, ScoreIdentity, DistributionMatching,
    ScoreImplicitMatching, FDivergence, VarDiU]}

def divergence_class(name):
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{name}' (choose from {', '.join(sorted(DIVERGENCES))})")
    return DIVERGENCES[name]

def divergence_options(name):
    """The keyword options a divergence's constructor accepts (its own and its bases')."""
    names = []
    for klass in divergence_class(name).__mro__:
        if '__init__' not in vars(klass):
            continue
        for param in inspect.signature(klass.__init__).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and param.name != 'self' \
                    and param.name not in names:
                names.append(param.name)
    return names

def make_divergence(name, **kwargs):
    accepted = divergence_options(name)
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        raise ValueError(f"divergence '{name}' has no option {', '.join(repr(k) for k in unknown)} "
            f"(its options: {', '.join(k for k in accepted if k != 'sigma_data')})")
    return DIVERGENCES[name](**kwargs)
