"""From resolved options to constructed objects and a running loop (refine.py's library side)."""

import json
import os
import shutil

import dnnlib
from refine import generators, speed, teachers
from refine.divergences import DIVERGENCES, DataError, adversarial, make_divergence
from refine.loop import refinement_loop
from torch_utils import distributed, train_utils

# EMA: Diff-Instruct's and SiD's 0.5 Mimg half-life with EDM's ramp-up (half-life <= 0.05 x images
# seen), so short runs average over their last few percent; see docs/mnist-teacher.md for short runs.
DEFAULTS = dict(divergence='di', batch=128, batch_gpu=None, lr=1e-5, glr=1e-5, sigma_init=None,
    kimg=200.0, tick=1.0, snap=10, seed=0, ema=500.0, ema_rampup=0.05, fake_steps=None, mlp_hidden=256, mlp_slots=0, div_opt=None,
    metrics=None, metric_ref=None, metric_batch=64, truncation=None, noise_mode=None, train_params=None,
    max_minutes=None, fake_warmup=0.0, lr_steps=None, restart_from_ema=False,
    data=None, # a dataset for the optional real-data terms (refine/divergences/adversarial.py)
    # Speed levers (refine/speed.py, training/networks_edm.py IMPLEMENTATION; docs/performance.md).
    reuse_samples=False, amp='auto', compile=False, fused_optim=True, tf32=True,
    attention='auto', dropout_mask='uniform', channels_last='auto', recompute=True, fused_norm=True)

# Settings for Gaussian-mixture (vector) teachers: small MLPs learn at higher rates, and the
# fake score needs several updates per generator update to keep up (tuned on ring8, see README);
# generator slots (8 per mixture component, 64 to 512) let mass sit on separated components
# without bridges (docs/gmm-benchmark.md).
VECTOR_DEFAULTS = dict(lr=3e-3, glr=1e-3, batch=256, ema=5.0, fake_steps=4, mlp_hidden=128, mlp_slots='auto')

def resolve_options(opts):
    """Fill defaults that depend on the teacher kind; returns an EasyDict of final options."""
    o = dnnlib.EasyDict(opts)
    vector = teachers.is_vector_teacher(o.teacher)
    fake_steps_given = o.get('fake_steps') is not None
    for key, value in DEFAULTS.items():
        if o.get(key) is None:
            o[key] = VECTOR_DEFAULTS.get(key, value) if vector else value
    o.div_opt = dict(o.div_opt or {})
    if o.mlp_slots not in (0, 'auto') and o.get('gen') != 'mlp':
        raise ValueError(f"--mlp-slots applies to --gen mlp, not --gen {o.get('gen')}")
    method = DIVERGENCES.get(o.divergence) # an unknown name is reported by prepare()
    if o.sigma_init is None and o.gen == 'teacher':
        # The method's generator input level (Diff-Instruct's README: 1.0; SiD/SIM 2.5; DMD 80).
        o.sigma_init = float(getattr(method, 'default_sigma_init', 1.0))
    if vector and not fake_steps_given and method is not None:
        # Vector MLP fake scores need >= 4 updates per generator update; a method without a
        # fake score (VarDiU) takes none, one that asks for more (DMD2: 5) keeps its ratio.
        own = getattr(method, 'default_fake_steps', 1)
        o.fake_steps = 0 if not getattr(method, 'uses_fake_score', True) else max(o.fake_steps, own)
    if o.data and o.divergence == 'fdiv' and 'ratio' not in o.div_opt:
        o.div_opt['ratio'] = 'disc' # f-distill's published ratio, from the discriminator
    return o

def prepare(o, generator=None):
    """Build teacher, generator, fake score and divergence, and check that they fit together.
    `generator`: a user's torch.nn.Module instead of `o.gen` (refine/api.py).

    Raises ValueError/OSError with a one-line message for anything a user can get wrong.
    """
    if o.metrics:
        from metrics import registry # pylint: disable=import-outside-toplevel
        registry.parse_names(o.metrics) # unknown names fail now, not at the first snapshot
        if not o.metric_ref:
            raise ValueError('--metrics needs --metric-ref (a dataset ZIP/directory or a reference .npz)')
    world = distributed.get_world_size()
    train_utils.split_batch(o.batch, o.batch_gpu, world) # one-line errors for --batch/--batch-gpu
    teacher = teachers.load_teacher(o.teacher, allow_code=o.allow_pickle_code)
    mlp_kwargs = dict(hidden=o.mlp_hidden)
    gen_mlp_kwargs = dict(mlp_kwargs, slots=o.mlp_slots)
    stylegan_kwargs = dict(truncation_psi=o.truncation, noise_mode=o.noise_mode, train_params=o.train_params)
    G, companions = generators.build_generator(o.gen, teacher, sigma_init=o.sigma_init,
        allow_code=o.allow_pickle_code, mlp_kwargs=gen_mlp_kwargs, stylegan_kwargs=stylegan_kwargs, module=generator)
    if not hasattr(G, 'snapshot_items') and any(v is not None for v in stylegan_kwargs.values()):
        raise ValueError('--truncation, --noise-mode and --train-params apply to StyleGAN generators (--gen stylegan.pkl)')
    generators.check_compatible(G, teacher)
    if o.get('gen') == 'mlp' and generator is None:
        o.mlp_slots = int(G.net.slots) # 'auto' resolved: the saved options rebuild this generator
    if o.metrics:
        if getattr(G, 'is_vector', False):
            raise ValueError(f'--metrics {o.metrics}: image metrics, but this generator makes vectors')
        registry.check_reference(o.metrics, o.metric_ref)
    fake = generators.build_fake_score(teacher, mlp_kwargs=mlp_kwargs)
    data = None
    if o.get('data'): # real images, checked against the teacher now (refine/divergences/adversarial.py)
        data = adversarial.open_images(o.data, teacher)
        adversarial.bottleneck_block(fake) # a fake score with a UNet bottleneck, or one line
    div_kwargs = dict(o.get('div_opt') or {}, sigma_data=teacher.sigma_data)
    if o.fake_steps is not None:
        div_kwargs['fake_steps'] = o.fake_steps
    try:
        divergence = make_divergence(o.divergence, data=data, **div_kwargs)
    except DataError:
        raise
    except ValueError as e:
        raise ValueError(f'--divergence {o.divergence} --div-opt: {e}') from None
    if hasattr(divergence, 'check_batch'):
        rounds, batch_gpu = train_utils.split_batch(o.batch, o.batch_gpu, world)
        divergence.check_batch(batch_gpu)

    summary = dict(options={k: v for k, v in o.items() if k not in ('resume', 'dry_run')},
        teacher=dict(kind=type(teacher).__name__, shape=list(teacher.shape), label_dim=teacher.label_dim,
            sigma_data=teacher.sigma_data, sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max),
        generator=dict(kind=type(G).__name__, params=generators.count_parameters(G),
            trained_params=generators.count_parameters(G, trainable_only=True),
            sigma_init=getattr(G, 'sigma_init', None), **(G.options() if hasattr(G, 'options') else {})),
        fake_score=dict(kind=type(fake).__name__, params=generators.count_parameters(fake)),
        divergence=divergence.options(), processes=world)
    return dnnlib.EasyDict(options=o, teacher=teacher, G=G, fake=fake, divergence=divergence,
        companions=companions, summary=summary)

def launch(setup, run_dir, resume_state=None, log=print, on_tick=None):
    o = setup.options
    if on_tick is None and isinstance(setup.teacher, teachers.GMMTeacher):
        # An exact teacher: per-tick unbiased MMD^2, mode coverage and weight error (gmm-metrics.jsonl).
        from refine import toy_metrics # pylint: disable=import-outside-toplevel
        on_tick = toy_metrics.TickLogger(setup.teacher, log=log)
    extra = dict(setup.companions, teacher=o.teacher, divergence=setup.divergence.options(),
        sigma_init=getattr(setup.G, 'sigma_init', None), refine_options=dict(setup.summary['options']))
    return refinement_loop(run_dir=run_dir, teacher=setup.teacher, G=setup.G, fake=setup.fake,
        divergence=setup.divergence, batch_size=o.batch, batch_gpu=o.batch_gpu, g_lr=o.glr,
        f_lr=o.lr, lr_steps=train_utils.parse_lr_steps(o.get('lr_steps')),
        restart_from_ema=bool(o.get('restart_from_ema')), ema_halflife_kimg=o.ema, ema_rampup=o.ema_rampup or None, total_kimg=o.kimg, fake_warmup_kimg=o.fake_warmup, kimg_per_tick=o.tick,
        time_limit_s=o.max_minutes * 60 if o.max_minutes else None,
        snapshot_ticks=o.snap, seed=o.seed, resume_state=resume_state, snapshot_extra=extra, log=log,
        on_tick=on_tick, on_snapshot=metrics_callback(o, run_dir, log),
        **speed_options(o, setup.teacher, setup.G))

def speed_options(o, teacher=None, G=None):
    """Apply the EDM networks' implementation choices; return the loop's speed keyword arguments
    (amp 'auto' becomes 'off' unless speed.amp_auto_applies to this teacher and generator)."""
    from training import networks_edm # pylint: disable=import-outside-toplevel
    networks_edm.set_implementation(attention=o.get('attention'), dropout=o.get('dropout_mask'),
        channels_last=o.get('channels_last'), recompute=o.get('recompute'), fused_norm=o.get('fused_norm'))
    levers = {key: o[key] for key in ('reuse_samples', 'amp', 'compile', 'fused_optim', 'tf32') if o.get(key) is not None}
    if levers.get('amp') == 'auto' and not speed.amp_auto_applies(teacher, G):
        levers['amp'] = 'off'
    return levers

def metrics_callback(o, run_dir, log=print):
    """Compute --metrics on each snapshot's G_ema (every process) and append metric-*.jsonl."""
    if not o.get('metrics'):
        return None
    from metrics import registry # pylint: disable=import-outside-toplevel (metrics are optional)

    def on_snapshot(G_ema, snapshot_path, kimg):
        device = next(G_ema.parameters()).device
        records = registry.compute_metrics(o.metrics, registry.generator_sample_fn(G_ema, device),
            num_labels=getattr(G_ema, 'label_dim', 0), ref=o.metric_ref, device=device, batch=o.metric_batch)
        if distributed.is_main():
            for record in records.values():
                registry.append_jsonl(run_dir, record, snapshot_pkl=os.path.basename(snapshot_path), kimg=kimg)
                log(f"{record['metric']} at {kimg:g} kimg: " + ', '.join(f'{k} {v:.4g}' for k, v in record['results'].items()))
    return on_snapshot

# Options that belong to one invocation, not to the run (never saved in options.json).
INVOCATION_OPTIONS = ('resume', 'dry_run', 'max_minutes', 'allow_pickle_code')

def save_options(run_dir, o):
    """options.json: what `refine.py --resume RUN` reads back to continue the run."""
    options = {k: v for k, v in o.items() if k not in INVOCATION_OPTIONS}
    train_utils.write_atomic(os.path.join(run_dir, 'options.json'), json.dumps(options, indent=2))

def make_run_dir(o, desc, outdir=None):
    """A new NNNNN-desc folder under `outdir` (default o.outdir) holding options.json; nothing
    is left behind if writing it fails."""
    run_dir = train_utils.next_run_dir(outdir or o.outdir, desc)
    os.makedirs(run_dir)
    try:
        save_options(run_dir, o)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir

