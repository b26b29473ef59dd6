"""The Python entry point: distil or refine any `torch.nn.Module` generator with a teacher.

    from refine.api import refine
    run_dir = refine(generator=MyGenerator(), teacher='edm.pkl', outdir='runs', kimg=100)
    refine(generator=MyGenerator(), resume=run_dir, kimg=200)      # continue it, bit for bit

`generator` is any module `G(z, c)` with the contract of our own generators
(training/networks_generators.py; docs/generators.md):
  * `z_shape` (a tuple, the shape of one latent) or `z_dim` (an int): z ~ N(0, I) [N, *z_shape];
  * `label_dim` (default 0): c is one-hot float [N, label_dim], None for an unconditional model;
    it must equal the teacher's number of classes;
  * the output is [N, *teacher shape] in the teacher's data space: images in [-1, 1] for EDM
    and pixel EDM2/diffusers teachers (their σ_data 0.5 scale), the VAE latents the teacher
    denoises for latent teachers (decoded by its encoder in samples, generate.py and fid.py),
    vectors for gmm: teachers;
  * optional `out_shape` (checked) and `trainable_parameters()` (only those train).
It is checked against the teacher before any work (one call on a batch of 2): a wrong shape,
label count, missing attribute or a module that cannot be pickled is a one-line ValueError.
The module is copied; the object passed in is left unchanged.

Snapshots and resume. Every snapshot pickles the trained module inside a `ModuleGenerator`
(NVlabs format). Decorate its class with `@torch_utils.persistence.persistent_class` and the
pickle carries the class's source, so generate.py and fid.py read it anywhere; without the
decorator it is pickled by name and its module must be importable where it is loaded. Either
way loading a snapshot runs the user's code, which the toolkit does only when told
(`--allow-pickle-code`, `allow_code=True`). Resuming needs no pickle: the training state holds
weights only, so `refine(generator=<a new module of the same class and arguments>, resume=RUN)`
loads them into the module passed (its class and parameter shapes are checked first) and runs
nothing from any file. `refine(resume=RUN, allow_code=True)` instead rebuilds the module from
the latest snapshot, which executes the source embedded there: only for runs you trust.

Options are refine.py's flags with underscores (`divergence='sid'`, `div_opt=dict(alpha=1.0)`,
`batch`, `lr`, `glr`, `kimg`, `tick`, `snap`, `seed`, `ema`, ...), with the same defaults. The
run folder is the one refine.py writes; `refine.py --resume` refuses it with a line that points
here, since only Python can supply the module.
"""

import json
import os
import re

import torch

from refine import generators, run
from refine.divergences import coerce_options, divergence_class
from torch_utils import cli, distributed, safe_pickle, train_utils

# Options that may change when a run resumes (as refine.py --resume allows).
RESUME_OPTIONS = ('kimg', 'max_minutes')

def refine(generator=None, teacher=None, outdir=None, *, resume=None, allow_code=False, **options):
    """Run refinement of `generator` (a torch.nn.Module) by `teacher` (what refine.py's --teacher
    takes: an EDM/EDM2 pickle path or URL, diffusers:PATH_OR_ID, gmm:NAME) in a new folder under
    `outdir`, or continue the run `resume` (its folder or a training-state .pt). Returns the run
    folder. `allow_code` lets pickles run their embedded code (trusted files only)."""
    unknown = sorted(set(options) - set(run.DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; the options are refine.py's "
            f"flags with underscores: {', '.join(sorted(run.DEFAULTS))}")
    distributed.init()
    if resume is not None:
        return _resume(resume, generator, teacher, outdir, allow_code, options)
    if not isinstance(generator, torch.nn.Module):
        raise ValueError(f'generator must be a torch.nn.Module, got {type(generator).__name__}')
    if not isinstance(teacher, str) or not teacher:
        raise ValueError(f"teacher must be what refine.py's --teacher takes (a path, URL, diffusers: or "
            f"gmm: name), got {teacher!r}")
    if not isinstance(outdir, (str, os.PathLike)):
        raise ValueError('outdir (where to make the run folder) is required')
    outdir = os.fspath(outdir)
    o = dict(options, teacher=teacher, gen=generators.python_spec(generator), outdir=outdir,
        resume=None, dry_run=False, allow_pickle_code=bool(allow_code))
    o = _resolve(o)
    if distributed.is_main():
        os.makedirs(outdir, exist_ok=True)
    torch.manual_seed(o.seed)
    setup = run.prepare(o, generator=generator)
    distributed.print0(json.dumps(setup.summary, indent=2))
    desc = f"{o.divergence}-{re.sub(r'[^A-Za-z0-9]+', '_', os.path.basename(o.teacher))[:40]}-gen_{type(generator).__name__[:20]}"
    run_dir = run.make_run_dir(o, desc) if distributed.is_main() else None
    run_dir = distributed.all_gather_object(run_dir)[0]
    _launch(setup, run_dir, None)
    return run_dir

def _resolve(opts):
    """refine.py's resolution of options: defaults, the divergence's name and typed options."""
    o = run.resolve_options(opts)
    divergence_class(o.divergence) # one line for an unknown name
    o.div_opt = coerce_options(o.divergence, o.div_opt)
    return o

def _launch(setup, run_dir, resume_state):
    with cli.run_log(os.path.join(run_dir, 'log.txt'), enabled=distributed.is_main()):
        distributed.print0(f'Run directory: {run_dir}')
        run.launch(setup, run_dir, resume_state=resume_state)

def _resume(resume, generator, teacher, outdir, allow_code, options):
    changed = sorted(set(options) - set(RESUME_OPTIONS))
    if teacher is not None or outdir is not None or changed:
        raise ValueError(f"resume continues a run with its own options; only {', '.join(RESUME_OPTIONS)} "
            f"may be given (got {', '.join(changed + [k for k, v in (('teacher', teacher), ('outdir', outdir)) if v is not None])})")
    resume_state = train_utils.latest_training_state(os.fspath(resume), log=distributed.print0)
    run_dir = os.path.dirname(os.path.abspath(resume_state))
    path = os.path.join(run_dir, 'options.json')
    try:
        with open(path, encoding='utf-8') as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot read {path}: {cli.one_line(e)}') from None
    if not isinstance(saved, dict) or not isinstance(saved.get('gen'), str) or not isinstance(saved.get('teacher'), str):
        raise ValueError(f'{path}: not the options of a refinement run')
    unknown = sorted(set(saved) - set(run.DEFAULTS) - {'teacher', 'gen', 'outdir'})
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    spec = saved['gen']
    from_python = spec.startswith(generators.PYTHON_PREFIX)
    if generator is not None and not isinstance(generator, torch.nn.Module):
        raise ValueError(f'generator must be a torch.nn.Module, got {type(generator).__name__}')
    if generator is not None and not from_python:
        raise ValueError(f'{run_dir} trains --gen {spec}, not a Python module; resume it without generator=')
    if generator is not None and generators.python_spec(generator) != spec:
        raise ValueError(f'{run_dir} trains {spec[len(generators.PYTHON_PREFIX):]}, but generator is a '
            f'{generators.python_spec(generator)[len(generators.PYTHON_PREFIX):]}')
    if generator is None and from_python:
        generator = _module_from_snapshot(run_dir, spec, allow_code)
    o = dict(saved, **{k: v for k, v in options.items() if v is not None}, resume=os.fspath(resume),
        dry_run=False, allow_pickle_code=bool(allow_code))
    o = _resolve(o)
    torch.manual_seed(o.seed)
    setup = run.prepare(o, generator=generator)
    if from_python:
        _check_state_fits(setup.G, resume_state)
    distributed.print0(json.dumps(setup.summary, indent=2))
    _launch(setup, run_dir, resume_state)
    return run_dir

def _module_from_snapshot(run_dir, spec, allow_code):
    """The user's module of a run's latest snapshot (its weights are the state's anyway)."""
    name = spec[len(generators.PYTHON_PREFIX):]
    if not allow_code:
        raise ValueError(f'{run_dir} trains a {name}: pass generator= a new module of that class (its '
            'weights come from the training state), or allow_code=True to rebuild it from the code '
            'embedded in the latest snapshot (trusted runs only)')
    snapshots = train_utils.numbered_files(run_dir, 'network-snapshot', 'pkl')
    if not snapshots:
        raise ValueError(f'{run_dir} has no network-snapshot-*.pkl to rebuild its {name} from; pass generator=')
    data = safe_pickle.load_network_pkl(snapshots[-1][1], allow_code=True)
    G = safe_pickle.require_module(data, 'G', source=snapshots[-1][1])
    if not hasattr(G, 'net') or not isinstance(G.net, torch.nn.Module):
        raise ValueError(f"{snapshots[-1][1]}: its 'G' is not a wrapped Python module")
    return G.net

def _check_state_fits(G, resume_state):
    """The module passed at resume has the parameters the training state holds, or one line."""
    saved = torch.load(resume_state, map_location='cpu', weights_only=True)['G']
    own = G.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    wrong = sorted(k for k in set(own) & set(saved) if own[k].shape != saved[k].shape)
    problems = [f"{label} {', '.join(k.removeprefix('net.') for k in keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for label, keys in (('missing', unexpected), ('not in the state', missing), ('other shape', wrong)) if keys]
    if problems:
        raise ValueError(f'generator does not fit {resume_state}: ' + '; '.join(problems)
            + ' (build it with the arguments of the original run)')
