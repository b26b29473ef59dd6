"""The refinement loop: alternate fake-score and generator updates, keep an EMA, write results.

It knows nothing about any particular divergence, teacher or generator: it is handed
constructed objects and talks to them only through G(z, c), teacher/fake D(x, sigma, c) and the
Divergence methods. Everything is counted in generator images (kimg). All random draws come
from torch_utils.rng, so a resumed run or a torchrun run reproduces one uninterrupted process.

Optional divergence hooks (duck-typed: a divergence defines only those it needs, and the loop
has no code for any particular one):
  setup(G=G, teacher=teacher, fake=fake)
                                  build divergence-owned modules once the shapes are known
                                  (called once, under a seed derived from the run's seed);
  trainable_modules()             those modules: trained by an extra Adam optimizer per update
                                  they take part in, named by `module_phase` ('generator' or
                                  'fake'; a module's own attribute, else the divergence's), at
                                  `module_lr` (likewise; None: that update's learning rate);
                                  saved in the training state;
  set_progress(cur_nimg)          called before every iteration (annealed schedules);
  draw_latents(rnd, z_shape)      the generator-update latents (e.g. antithetic pairs);
  uses_latents = True             generator_loss() then also receives `z=` those latents.
`on_tick(info)` (an argument of the loop) is called on the main process at the end of every
tick with the current networks; the time it takes is reported in the tick's record.
"""

import copy
import os
import resource
import time

import torch

import dnnlib
from refine import speed
from refine.plots import save_scatter_png
from torch_utils import distributed, persistence, train_utils, training_stats
from torch_utils.images import save_image_grid
from torch_utils.rng import StreamRandom, derive_seed

def refinement_loop(
    run_dir,                        # Output directory (exists).
    teacher,                        # Frozen teacher denoiser D_phi(x, sigma, c).
    G,                              # Generator G(z, c) being refined.
    fake,                           # Fake score D_psi, trained on the generator's samples.
    divergence,                     # refine.divergences.Divergence.
    batch_size          = 256,      # Global batch: generator images per iteration, all processes.
    batch_gpu           = None,     # Images per process per accumulation round; None = no rounds.
    g_lr                = 1e-5,     # Generator learning rate.
    f_lr                = 1e-5,     # Fake-score learning rate.
    lr_steps            = (),       # ((kimg, factor), ...): from each kimg on, every learning rate is factor x its own.
    restart_from_ema    = False,    # At each lr_steps step the generator continues from its EMA.
    betas               = (0.0, 0.999), # Adam betas of both optimizers.
    ema_halflife_kimg   = 0.5,      # Half-life of the generator EMA.
    ema_rampup          = 0.05,     # EMA ramp-up: half-life <= this fraction of images seen; None = off.
    total_kimg          = 100,      # Training duration.
    fake_warmup_kimg    = 0,        # The first this many kimg update only the fake score (counted in total_kimg).
    time_limit_s        = None,     # Also stop at the first tick after this many seconds (snapshot and state included).
    kimg_per_tick       = 1,        # Progress line and statistics interval.
    snapshot_ticks      = 10,       # Snapshot (pickle, grid) interval in ticks; None = only at the end.
    state_ticks         = None,     # Training-state interval in ticks; None = with the snapshots.
    seed                = 0,        # Seed of every random draw.
    resume_state        = None,     # training-state-*.pt to continue from.
    snapshot_extra      = {},       # Items added to every snapshot (options needed to use it).
    grid_size           = 64,       # Images in each snapshot's PNG (vector data: 2048 points).
    log                 = print,    # Progress output (rank 0 decides to print).
    on_tick             = None,     # Callback(EasyDict) at the end of every tick, main process only.
    on_snapshot         = None,     # Callback(G_ema, snapshot_path, kimg) after each snapshot, every process (metrics).
    reuse_samples       = False,    # The generator update goes first; its samples (detached) feed the first fake-score update.
    amp                 = 'off',    # bf16 autocast: 'off', 'nograd', 'loss', 'all' or 'auto' (refine/speed.py).
    compile             = False,    # torch.compile the networks' calls: True (inductor) or a backend name.
    fused_optim         = True,     # Fused Adam steps and a foreach EMA.
    tf32                = True,     # TF32 products and convolutions on GPUs.
    timer               = None,     # Callable(phase_name) -> context manager around each phase (bench/throughput.py).
):
    device = distributed.device()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    rounds, batch_gpu = train_utils.split_batch(batch_size, batch_gpu, world)
    is_main = rank == 0
    say = log if is_main else (lambda *_: None)

    teacher = teacher.to(device).eval().requires_grad_(False)
    # A generator may train only some of its parameters (`trainable_parameters()`, e.g. a
    # StyleGAN with its mapping network frozen); the others keep requires_grad False.
    G = G.to(device).train().requires_grad_(False)
    g_params = list(G.trainable_parameters()) if hasattr(G, 'trainable_parameters') else list(G.parameters())
    for p in g_params:
        p.requires_grad_(True)
    fake = fake.to(device).train().requires_grad_(True)
    for module in (G, fake):
        distributed.broadcast_module(module)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    levers = speed.Levers(device, divergence, amp=amp, compile=compile, fused_optim=fused_optim, tf32=tf32, timer=timer)
    G_call, fake_call, teacher_call = levers.call(G), levers.call(fake), levers.call(teacher)
    g_opt = levers.adam(g_params, lr=g_lr, betas=betas)
    f_opt = levers.adam(fake.parameters(), lr=f_lr, betas=betas)
    label_dim = getattr(G, 'label_dim', 0)

    # Divergence-owned trainable modules (an encoder, a density-ratio head, ...), if any.
    if hasattr(divergence, 'setup'):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 'divergence-setup'))
            divergence.setup(G=G, teacher=teacher, fake=fake)
    extra = list(divergence.trainable_modules()) if hasattr(divergence, 'trainable_modules') else []
    for module in extra:
        module.to(device).train().requires_grad_(True)
        distributed.broadcast_module(module)
    by_phase = {} # phase -> its modules, in the order trainable_modules() gives them
    for module in extra:
        phase = getattr(module, 'module_phase', None) or getattr(divergence, 'module_phase', 'generator')
        if phase not in ('generator', 'fake'):
            raise ValueError(f"divergence module_phase must be 'generator' or 'fake', got {phase!r}")
        by_phase.setdefault(phase, []).append(module)
    x_groups = {} # phase -> (modules, one Adam over them; a parameter group per learning rate)
    for phase, modules in by_phase.items():
        lrs = [(module.module_lr if hasattr(module, 'module_lr') else getattr(divergence, 'module_lr', None))
            or (g_lr if phase == 'generator' else f_lr) for module in modules]
        if len(set(lrs)) == 1:
            x_opt = levers.adam([p for m in modules for p in m.parameters()], lr=lrs[0], betas=betas)
        else:
            x_opt = levers.adam([dict(params=list(m.parameters()), lr=lr) for m, lr in zip(modules, lrs)],
                lr=lrs[0], betas=betas)
        x_groups[phase] = (modules, x_opt)
    x_opts = [x_opt for _, x_opt in x_groups.values()]
    def x_group(phase):
        return [x_groups[phase]] if phase in x_groups else []
    uses_latents = getattr(divergence, 'uses_latents', False)
    # Every rate is set from the options at each iteration (not kept from a resumed optimizer
    # state), so a resumed run follows the schedule its options.json names.
    optimizers = [g_opt, f_opt, *x_opts]
    base_lrs = [[group['lr'] for group in opt.param_groups] for opt in optimizers]
    def set_learning_rates(nimg):
        factor = train_utils.lr_factor(lr_steps, nimg)
        for opt, lrs in zip(optimizers, base_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group['lr'] = lr * factor
        return factor

    cur_nimg, cur_tick = 0, 0
    if resume_state is not None:
        state = torch.load(resume_state, map_location=device, weights_only=True)
        G.load_state_dict(state['G'])
        G_ema.load_state_dict(state['G_ema'])
        fake.load_state_dict(state['fake'])
        g_opt.load_state_dict(state['g_opt'])
        f_opt.load_state_dict(state['f_opt'])
        if extra:
            for module, sd in zip(extra, state['divergence_modules']):
                module.load_state_dict(sd)
            saved = state['x_opt'] if isinstance(state['x_opt'], list) else [state['x_opt']]
            for x_opt, sd in zip(x_opts, saved):
                x_opt.load_state_dict(sd)
        cur_nimg, cur_tick = state['cur_nimg'], state['cur_tick']
        say(f'Resuming from {resume_state} at {cur_nimg / 1e3:.1f} kimg')
        if is_main: # the ticks after the state are replayed: their records go
            train_utils.truncate_jsonl(os.path.join(run_dir, 'stats.jsonl'), lambda r: r.get('tick', 0) <= cur_tick)
            for name in os.listdir(run_dir): # metric-*.jsonl, gmm-metrics.jsonl
                if name.endswith('.jsonl') and name != 'stats.jsonl':
                    train_utils.truncate_jsonl(os.path.join(run_dir, name), lambda r: r.get('kimg', 0) <= cur_nimg / 1e3)
    if is_main:
        train_utils.remove_stale_temp_files(run_dir)
    last_snapshot = ([path for kimg, path in train_utils.numbered_files(run_dir, 'network-snapshot', 'pkl')
        if kimg <= cur_nimg / 1e3] or [None])[-1]

    def draws(position, phase, part_round):
        """This process's part of a phase's random draws, and a matching seed for the draws the
        networks make themselves (dropout, StyleGAN's per-pixel noise)."""
        part = rank * rounds + part_round
        torch.manual_seed(derive_seed(seed, position, phase, part, 'dropout'))
        return StreamRandom(seed, position, phase, batch_size, part=part, parts=world * rounds, device=device)

    def accumulate_and_step(groups, loss_of_round):
        """Sum per-sample losses over rounds, average over the global batch, step every
        (modules, optimizer) group."""
        for _, optimizer in groups:
            optimizer.zero_grad(set_to_none=True)
        for r in range(rounds):
            loss = loss_of_round(r)
            (loss.sum() / batch_size).backward()
        for modules, optimizer in groups:
            train_utils.sync_gradients([p for m in modules for p in m.parameters()])
            optimizer.step()

    stats = training_stats.Collector()
    grid_n = 2048 if getattr(G, 'is_vector', False) else grid_size # a scatter plot needs more points
    grid_z = StreamRandom(seed, 'grid', 'z', grid_n, device=device).randn(*G.z_shape)
    grid_c = StreamRandom(seed, 'grid', 'c', grid_n, device=device).labels(label_dim)
    start_time = tick_start_time = time.time()
    tick_start_nimg = cur_nimg
    done = cur_nimg >= total_kimg * 1000
    say(f'Refining for {total_kimg} kimg: batch {batch_size} over {world} process(es), '
        f'{rounds} round(s) of {batch_gpu}, divergence {divergence.name}'
        + (f', bf16 autocast ({levers.amp})' if levers.amp != 'off' else ''))

    while not done:
        lr_factor = set_learning_rates(cur_nimg)
        if lr_factor != train_utils.lr_factor(lr_steps, cur_nimg - batch_size) and cur_nimg > 0:
            # A generator trained at a high rate wanders around the point its EMA averages;
            # continued at a lower rate from where it is, its EMA converges to that worse point.
            if restart_from_ema:
                with torch.no_grad():
                    for name, value in G_ema.state_dict().items():
                        G.state_dict()[name].copy_(value)
            say(f'Learning rates x{lr_factor:g} from {cur_nimg / 1e3:g} kimg'
                + (', the generator continues from its EMA' if restart_from_ema else ''))
        if hasattr(divergence, 'set_progress'):
            divergence.set_progress(cur_nimg)
        # The generator update waits until the fake score has warmed up on the generator's
        # samples: it starts as the teacher, so until it has learnt p_G its difference from the
        # teacher is noise (a GAN being refined starts far from the teacher's distribution).
        warming_up = cur_nimg < fake_warmup_kimg * 1000
        # With reuse_samples the generator update goes first and its samples, detached, are the
        # first fake-score update's (which still makes its own draws, so its σ and noise are the
        # same as without): one generator forward fewer, and the generator sees a fake score one
        # update older (docs/performance.md).
        reuse = reuse_samples and not warming_up and divergence.fake_steps > 0
        kept = {} # accumulation round -> (detached samples, labels) of the generator update

        def fake_round(r, k):
            rnd = draws(cur_nimg, f'fake{k}', r)
            z, c = rnd.randn(*G.z_shape), rnd.labels(label_dim)
            if k == 0 and r in kept:
                x_g, c = kept.pop(r)
            else:
                with torch.no_grad(), levers.precision('generator'):
                    G.eval()
                    x_g = G_call(z, c)
                    G.train()
            with levers.precision('fake'):
                loss = divergence.fake_loss(fake_call, x_g, c, rnd)
            training_stats.report('loss_fake', loss)
            return loss

        def fake_updates(): # on detached generator samples
            for k in range(divergence.fake_steps):
                fake.train()
                accumulate_and_step([([fake], f_opt)] + x_group('fake'),
                    lambda r, k=k: fake_round(r, k))

        def gen_round(r):
            rnd = draws(cur_nimg, 'gen', r)
            if hasattr(divergence, 'draw_latents'):
                z = divergence.draw_latents(rnd, G.z_shape)
            else:
                z = rnd.randn(*G.z_shape)
            c = rnd.labels(label_dim)
            kwargs = dict(z=z) if uses_latents else {}
            with levers.precision('generator'):
                x_g = G_call(z, c)
            if reuse:
                kept[r] = (x_g.detach(), c)
            with levers.precision('loss'):
                loss, gen_stats = divergence.generator_loss(teacher_call, fake_call, x_g, c, rnd, **kwargs)
            training_stats.report('loss_gen', loss)
            for name, value in gen_stats.items():
                training_stats.report(name, value)
            return loss

        if not reuse:
            with levers.phase('fake'):
                fake_updates()
        if not warming_up:
            with levers.phase('generator'):
                fake.eval()
                accumulate_and_step([([G], g_opt)] + x_group('generator'), gen_round)
        if reuse:
            with levers.phase('fake'):
                fake_updates()
        cur_nimg += batch_size

        # EMA by half-life in images, ramped up early in training.
        with levers.phase('ema'):
            levers.update_ema(G_ema, G, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup)
        levers.unmark(G, G_ema, fake, teacher) # what is saved carries nothing of torch.compile

        done = cur_nimg >= total_kimg * 1000
        if not done and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
            continue

        # End of tick: statistics, progress, snapshots, training state.
        cur_tick += 1
        now = time.time()
        if time_limit_s is not None and not done: # rank 0's clock decides for every process
            done = distributed.all_gather_object(now - start_time >= time_limit_s)[0]
        summary = stats.update().as_dict()
        train_utils.check_finite(cur_tick, cur_nimg / 1e3,
            {k: v['mean'] for k, v in summary.items() if k.startswith('loss')},
            dict(G=G, fake_score=fake, G_ema=G_ema, **{f'divergence module {i}': m for i, m in enumerate(extra)}),
            last_good=last_snapshot)
        tick_kimg = (cur_nimg - tick_start_nimg) / 1e3
        record = dict(tick=cur_tick, kimg=cur_nimg / 1e3, time=now - start_time,
            sec_per_kimg=(now - tick_start_time) / max(tick_kimg, 1e-8),
            maxrss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            peak_gpu_gb=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == 'cuda' else 0.0,
            lr_factor=lr_factor, **summary)
        say(' '.join([f"tick {cur_tick:<4d} kimg {record['kimg']:<8.1f}",
            f"time {dnnlib.util.format_time(record['time']):<9s}",
            f"sec/kimg {record['sec_per_kimg']:<7.2f}",
            *[f'{k} {v["mean"]:<9.4g}' for k, v in summary.items() if k.startswith('loss')],
            f"cpumem {record['maxrss_gb']:.2f}", f"gpumem {record['peak_gpu_gb']:.2f}"]))
        if is_main and on_tick is not None:
            callback_start = time.time()
            on_tick(dnnlib.EasyDict(cur_nimg=cur_nimg, cur_tick=cur_tick, done=done, G=G, G_ema=G_ema,
                fake=fake, divergence=divergence, run_dir=run_dir))
            record['callback_sec'] = time.time() - callback_start
        if is_main:
            training_stats.append_jsonl(os.path.join(run_dir, 'stats.jsonl'), training_stats.with_nvlabs_keys(record))

        snapshot_due = done or (snapshot_ticks is not None and cur_tick % snapshot_ticks == 0)
        every = state_ticks if state_ticks is not None else snapshot_ticks
        state_due = done or (every is not None and cur_tick % every == 0)
        tag = train_utils.snapshot_tag(cur_nimg, tick_start_nimg)
        snapshot_path = os.path.join(run_dir, f'network-snapshot-{tag}.pkl')
        if snapshot_due and is_main:
            save_snapshot(snapshot_path, G_ema=G_ema, G=G, fake=fake, extra=dict(snapshot_extra, kimg=cur_nimg / 1e3))
            save_sample_png(G_ema, grid_z, grid_c, os.path.join(run_dir, f'samples-{tag}.png'), decoder=snapshot_extra.get('encoder'),
                components=teacher if hasattr(teacher, 'means') else None) # a GMM's ellipses
        if snapshot_due:
            last_snapshot = snapshot_path
        if snapshot_due and on_snapshot is not None:
            distributed.barrier() # the snapshot file exists before anyone reads it
            on_snapshot(G_ema, snapshot_path, cur_nimg / 1e3)
        if state_due and is_main:
            train_utils.save_training_state(os.path.join(run_dir, f'training-state-{tag}.pt'),
                dict(G=G.state_dict(), G_ema=G_ema.state_dict(), fake=fake.state_dict(),
                    g_opt=g_opt.state_dict(), f_opt=f_opt.state_dict(),
                    cur_nimg=cur_nimg, cur_tick=cur_tick,
                    **(dict(divergence_modules=[m.state_dict() for m in extra],
                        x_opt=x_opts[0].state_dict() if len(x_opts) == 1 else [o.state_dict() for o in x_opts])
                        if extra else {})))
        distributed.barrier()
        tick_start_nimg, tick_start_time = cur_nimg, time.time()

    say(f'Finished at {cur_nimg / 1e3:g} kimg.')
    return dnnlib.EasyDict(G=G, G_ema=G_ema, fake=fake, cur_nimg=cur_nimg, divergence_modules=extra)

#----------------------------------------------------------------------------

def save_snapshot(path, G_ema, G, fake, extra):
    """NVlabs-format pickle of the networks (CPU, eval, frozen) plus the options to use them."""
    def frozen(module):
        return copy.deepcopy(module).eval().requires_grad_(False).cpu()
    data = dict(G_ema=frozen(G_ema), G=frozen(G), fake=frozen(fake))
    if hasattr(data['G_ema'], 'sigma_init'): # SiD / Diff-Instruct tools read 'ema' at sigma_init
        data['ema'] = data['G_ema'].net
    if hasattr(data['G_ema'], 'snapshot_items'): # e.g. StyleGAN: its own networks, unwrapped
        data.update(data['G_ema'].snapshot_items(data['G']))
    data.update(extra)
    persistence.save_network_pkl(data, path)

def save_sample_png(G, z, c, path, decoder=None, components=None):
    """A grid of G's samples; `decoder` (a latent teacher's encoder) turns latents into images."""
    with torch.no_grad():
        x = G(z, c)
        x = (decoder.decode(x) if decoder is not None else x).cpu()
    if getattr(G, 'is_vector', False):
        save_scatter_png(x[:, :2].numpy(), path, components=components)
    else:
        save_image_grid(x, path)
