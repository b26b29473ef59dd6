"""Divergences between the generator's and the teacher's distributions; one file each."""

import inspect
import math

from refine.divergences import adversarial
from refine.divergences.base import Divergence
from refine.divergences.di import DiffInstruct
from refine.divergences.dmd import DMD2, DistributionMatching
from refine.divergences.fdiv import FDivergence
from refine.divergences.sid import SiDA, ScoreIdentity
from refine.divergences.sim import ScoreImplicitMatching
from refine.divergences.vardiu import VarDiU

DIVERGENCES = {cls.name: cls for cls in [DiffInstruct, ScoreIdentity, DistributionMatching,
    ScoreImplicitMatching, FDivergence, VarDiU, SiDA, DMD2]}

# The real-data terms' options, `--div-opt gan_KEY=VALUE` (refine/divergences/adversarial.py).
GAN_PREFIX = 'gan_'

class DataError(ValueError):
    """A problem with --data or with what needs it (the message names the flag)."""

def takes_real_data(name):
    """Whether a divergence can take the real-data terms (it learns a fake score)."""
    return getattr(divergence_class(name), 'uses_fake_score', True)

def divergence_class(name):
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{name}' (choose from {', '.join(sorted(DIVERGENCES))})")
    return DIVERGENCES[name]

def option_defaults(name, real_data=True):
    """{option: default} of the keyword options a divergence's constructor accepts (its own and
    its bases'), in declaration order; then, if it can take them, the real-data terms' options
    (gan_*, used with --data)."""
    defaults = {}
    for klass in divergence_class(name).__mro__:
        if '__init__' not in vars(klass):
            continue
        for param in inspect.signature(klass.__init__).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and param.name != 'self' \
                    and param.name not in defaults:
                defaults[param.name] = None if param.default is param.empty else param.default
    if real_data and takes_real_data(name):
        defaults.update({GAN_PREFIX + k: v for k, v in adversarial.gan_defaults(divergence_class(name)).items()})
    return defaults

def divergence_options(name):
    """The keyword options a divergence's constructor accepts."""
    return list(option_defaults(name, real_data=False))

# Options that are not the user's to set through --div-opt: they come from elsewhere.
RESERVED_OPTIONS = {'sigma_data': 'it comes from the teacher', 'fake_steps': 'use --fake-steps'}

_TRUE, _FALSE = ('true', 'yes', 'on', '1'), ('false', 'no', 'off', '0')

def coerce_option(name, key, value):
    """`value` (a string from the command line, or a JSON value from a saved run) as the type of
    the option's default; ValueError naming the option otherwise."""
    defaults = option_defaults(name)
    if key in RESERVED_OPTIONS:
        raise ValueError(f"--div-opt {key}: not a divergence option here ({RESERVED_OPTIONS[key]})")
    if key not in defaults:
        public = [k for k in defaults if k not in RESERVED_OPTIONS]
        raise ValueError(f"--div-opt {key}: divergence '{name}' has no such option "
            f"(its options: {', '.join(public)}; --div-opt help lists them)")
    default, text = defaults[key], value.strip() if isinstance(value, str) else None
    where = f'--div-opt {key}={value}'
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f'{where}: expected true or false')
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or (text is not None and text.lower() in _TRUE + _FALSE and not text.isdigit()):
            raise ValueError(f'{where}: expected a number, not a truth value')
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            raise ValueError(f"{where}: expected a finite number")
        if isinstance(default, float):
            return number
        if number != int(number):
            raise ValueError(f'{where}: expected an integer')
        return int(number) # 7e2 is 700
    if text is None:
        return value # a structured value from a saved run (dict, list, None)
    if default is None or isinstance(default, (dict, list)):
        lowered = text.lower()
        if lowered in ('none', 'null'):
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    return text

def coerce_options(name, opts):
    """Every option of `opts` through coerce_option."""
    return {key: coerce_option(name, key, value) for key, value in (opts or {}).items()}

def describe_options(name):
    """Lines listing a divergence's options and their defaults (for --div-opt help)."""
    lines = [f"Options of divergence '{name}' (--div-opt KEY=VALUE):"]
    real = False
    for key, default in option_defaults(name).items():
        if key.startswith(GAN_PREFIX) and not real:
            lines.append('  with --data (real-data GAN terms):')
            real = True
        if key not in RESERVED_OPTIONS:
            lines.append(f'  {key:<20s} default {default!r}')
    return lines

def make_divergence(name, data=None, **kwargs):
    """The divergence `name` with its options; with `data` (adversarial.RealImages) also the
    real-data terms, configured by the gan_* options. Without `data` nothing of those exists."""
    gan = {key[len(GAN_PREFIX):]: kwargs.pop(key) for key in list(kwargs) if key.startswith(GAN_PREFIX)}
    accepted = divergence_options(name)
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        raise ValueError(f"divergence '{name}' has no option {', '.join(repr(k) for k in unknown)} "
            f"(its options: {', '.join(k for k in accepted if k != 'sigma_data')})")
    divergence = DIVERGENCES[name](**kwargs)
    if data is None:
        if getattr(divergence, 'needs_data', False):
            raise DataError(f"--divergence {name}: needs real images, pass --data DATASET"
                + (" (or ratio=score, the data-free ratio)" if name == 'fdiv' else ''))
        if gan:
            raise DataError(f"--div-opt {', '.join(GAN_PREFIX + k for k in gan)}: options of the real-data "
                'terms, which need --data DATASET')
        return divergence
    if not takes_real_data(name):
        raise DataError(f"--data: divergence '{name}' learns no fake score, so there is no bottleneck "
            'for a discriminator')
    unknown = [GAN_PREFIX + k for k in gan if k not in adversarial.GAN_DEFAULTS]
    if unknown:
        raise ValueError(f"no real-data option {', '.join(unknown)}")
    return adversarial.with_real_data(divergence, data, **gan)
