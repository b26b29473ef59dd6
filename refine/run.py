"""From resolved options to constructed objects and a running loop (refine.py's library side)."""

import dnnlib
from refine import generators, teachers
from refine.divergences import make_divergence
from refine.loop import refinement_loop
from torch_utils import distributed

DEFAULTS = dict(divergence='di', batch=128, batch_gpu=None, lr=1e-5, glr=1e-5, sigma_init=None,
    kimg=200.0, tick=1.0, snap=10, seed=0, ema=0.5, fake_steps=None, mlp_hidden=256)

# Settings for Gaussian-mixture (vector) teachers: small MLPs learn at higher rates, and the
# fake score needs several updates per generator update to keep up (tuned on ring8, see README).
VECTOR_DEFAULTS = dict(lr=3e-3, glr=1e-3, batch=256, ema=5.0, fake_steps=4, mlp_hidden=128)

def resolve_options(opts):
    """Fill defaults that depend on the teacher kind; returns an EasyDict of final options."""
    o = dnnlib.EasyDict(opts)
    vector = o.teacher.startswith('gmm:')
    for key, value in DEFAULTS.items():
        if o.get(key) is None:
            o[key] = VECTOR_DEFAULTS.get(key, value) if vector else value
    if o.sigma_init is None and o.gen == 'teacher':
        o.sigma_init = 1.0 # Diff-Instruct's README setting
    return o

def prepare(o):
    """Build teacher, generator, fake score and divergence, and check that they fit together.

    Raises ValueError/OSError with a one-line message for anything a user can get wrong.
    """
    teacher = teachers.load_teacher(o.teacher, allow_code=o.allow_pickle_code)
    mlp_kwargs = dict(hidden=o.mlp_hidden)
    G = generators.build_generator(o.gen, teacher, sigma_init=o.sigma_init,
        allow_code=o.allow_pickle_code, mlp_kwargs=mlp_kwargs)
    generators.check_compatible(G, teacher)
    fake = generators.build_fake_score(teacher, mlp_kwargs=mlp_kwargs)
    div_kwargs = dict(sigma_data=teacher.sigma_data)
    if o.fake_steps is not None:
        div_kwargs['fake_steps'] = o.fake_steps
    divergence = make_divergence(o.divergence, **div_kwargs)
    world = distributed.get_world_size()
    if o.batch % world != 0:
        raise ValueError(f'--batch {o.batch} does not split over {world} processes')

    summary = dict(options={k: v for k, v in o.items() if k not in ('resume', 'dry_run')},
        teacher=dict(kind=type(teacher).__name__, shape=list(teacher.shape), label_dim=teacher.label_dim,
            sigma_data=teacher.sigma_data, sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max),
        generator=dict(kind=type(G).__name__, params=generators.count_parameters(G),
            sigma_init=getattr(G, 'sigma_init', None)),
        fake_score=dict(kind=type(fake).__name__, params=generators.count_parameters(fake)),
        divergence=divergence.options(), processes=world)
    return dnnlib.EasyDict(options=o, teacher=teacher, G=G, fake=fake, divergence=divergence, summary=summary)

def launch(setup, run_dir, resume_state=None, log=print):
    o = setup.options
    extra = dict(teacher=o.teacher, divergence=setup.divergence.options(),
        sigma_init=getattr(setup.G, 'sigma_init', None), refine_options=dict(setup.summary['options']))
    return refinement_loop(run_dir=run_dir, teacher=setup.teacher, G=setup.G, fake=setup.fake,
        divergence=setup.divergence, batch_size=o.batch, batch_gpu=o.batch_gpu, g_lr=o.glr,
        f_lr=o.lr, ema_halflife_kimg=o.ema, total_kimg=o.kimg, kimg_per_tick=o.tick,
        snapshot_ticks=o.snap, seed=o.seed, resume_state=resume_state, snapshot_extra=extra, log=log)
