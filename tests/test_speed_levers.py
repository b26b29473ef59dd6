"""The speed levers keep results the same where they should (docs/performance.md).

  * SDPA attention matches the explicit product to float32 rounding; the 16-bit dropout mask
    drops at the stated rate, unbiased and reproducibly; recomputed GroupNorm-SiLU-conv chains
    give bit-identical outputs and gradients;
  * reuse of samples: the fake-score update sees exactly the generator update's samples and
    computes the same loss on the same draws as without reuse;
  * bf16 autocast: losses within the tolerances stated below of float32;
  * with every lever on, resume is exact and 2 processes under torchrun match 1 process with 2
    accumulation rounds; a compiled run writes the same snapshot bytes as an uncompiled one.

Run as a script, this file is the torchrun worker of the last test.
"""

import copy
import glob
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from refine import generators, speed, teachers # pylint: disable=wrong-import-position
from refine.divergences import make_divergence # pylint: disable=wrong-import-position
from refine.loop import refinement_loop # pylint: disable=wrong-import-position
from torch_utils import safe_pickle # pylint: disable=wrong-import-position
from torch_utils.rng import StreamRandom, derive_seed # pylint: disable=wrong-import-position
from training import networks_edm as N # pylint: disable=wrong-import-position
from tests.scripts import free_port # pylint: disable=wrong-import-position

@pytest.fixture(autouse=True)
def restore_implementation():
    previous = dict(N.IMPLEMENTATION)
    yield
    N.set_implementation(**previous)

def tiny_net(dropout=0.2, model_type='SongUNet', **kwargs):
    torch.manual_seed(0)
    net = N.EDMPrecond(img_resolution=8, img_channels=1, label_dim=2, model_type=model_type,
        model_channels=kwargs.pop('model_channels', 8), channel_mult=[1, 2], num_blocks=1,
        attn_resolutions=[4], dropout=dropout, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net

#----------------------------------------------------------------------------
# Network implementation choices.

def test_sdpa_attention_matches_explicit_product():
    q, k, v = torch.randn(3, 6, 16, 36).unbind(0)
    N.set_implementation(attention='matmul')
    ref = N.attend(q, k, v)
    N.set_implementation(attention='sdpa')
    torch.testing.assert_close(N.attend(q, k, v), ref, rtol=1e-5, atol=1e-6)
    net = tiny_net(dropout=0).eval()
    x, s, c = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 0.5, 2.0, 20.0]), torch.eye(2)[[0, 1, 0, 1]]
    N.set_implementation(attention='matmul')
    ref = net(x, s, c)
    N.set_implementation(attention='sdpa')
    torch.testing.assert_close(net(x, s, c), ref, rtol=1e-5, atol=1e-5)
    N.set_implementation(attention='auto') # matmul on CPUs
    assert torch.equal(net(x, s, c), ref)

def test_uniform_dropout_mask_rate_scale_and_stream():
    p = 0.13
    keep, rate = N.dropout_keep_mask((1000, 1000), p, 'cpu')
    assert rate == round(p * 65536) / 65536 and abs(rate - p) < 2**-17
    assert abs(keep.float().mean().item() - (1 - rate)) < 5 * (rate * (1 - rate) / 1e6) ** 0.5
    x = torch.ones(2000, 1000)
    N.set_implementation(dropout='uniform')
    torch.manual_seed(5)
    y = N.apply_dropout(x, p, True)
    assert set(torch.unique(y).tolist()) == {0.0, torch.tensor(1 / (1 - rate)).item()}
    assert abs(y.mean().item() - 1) < 5e-3 # unbiased
    torch.manual_seed(5)
    assert torch.equal(N.apply_dropout(x, p, True), y) # the same seed, the same mask
    assert torch.equal(N.apply_dropout(x, p, False), x) and torch.equal(N.apply_dropout(x, 0, True), x)
    N.set_implementation(dropout='bernoulli') # NVlabs' stream
    torch.manual_seed(5)
    y = N.apply_dropout(x, p, True)
    torch.manual_seed(5)
    assert torch.equal(y, torch.nn.functional.dropout(x, p, True))

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_recompute_gives_bit_identical_outputs_and_gradients(model_type):
    net = tiny_net(model_type=model_type, **(dict(model_channels=64) if model_type == 'DhariwalUNet' else {}))
    x, s, c = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 1.0, 5.0]), torch.eye(2)[[0, 1, 1]]
    results = {}
    for recompute in (False, True):
        N.set_implementation(recompute=recompute, dropout='uniform')
        for train in (True, False):
            net.train(train).zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(1)
            y = net(xi, s, c)
            (y.square().sum() + y.sum()).backward()
            results[recompute, train] = [y.detach(), xi.grad] + [p.grad for p in net.parameters()]
    for train in (True, False):
        assert all(torch.equal(a, b) for a, b in zip(results[False, train], results[True, train]))

def test_recompute_keeps_less_for_the_backward_pass():
    net = tiny_net().train()
    x, s, c = torch.randn(8, 1, 8, 8), torch.rand(8) + 0.1, torch.eye(2)[[0, 1] * 4]
    def saved_bytes():
        storages = {}
        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x, s, c)
        return sum(storages.values())
    N.set_implementation(recompute=False)
    before = saved_bytes()
    N.set_implementation(recompute=True)
    assert saved_bytes() < 0.75 * before

def test_set_implementation_validates():
    with pytest.raises(ValueError, match='attention'):
        N.set_implementation(attention='flash')
    with pytest.raises(ValueError, match='unknown implementation setting'):
        N.set_implementation(precision='bf16')

#----------------------------------------------------------------------------
# The loop's levers.

def _setup(divergence='di', dropout=0.2, seed=0):
    teacher = teachers.EDMTeacher(tiny_net(dropout=dropout))
    torch.manual_seed(seed)
    G, _ = generators.build_generator('teacher', teacher, sigma_init=2.5)
    fake = generators.build_fake_score(teacher)
    return teacher, G, fake, make_divergence(divergence, sigma_data=teacher.sigma_data)

LEVERS_ON = dict(reuse_samples=True, amp='off', compile=False, fused_optim=True)

def _loop(run_dir, kimg, divergence='di', resume_state=None, batch_gpu=None, impl=None, lr=1e-3, **levers):
    N.set_implementation(**(impl or dict(attention='sdpa', dropout='uniform', recompute=True)))
    os.makedirs(run_dir, exist_ok=True)
    teacher, G, fake, div = _setup(divergence)
    return refinement_loop(run_dir=str(run_dir), teacher=teacher, G=G, fake=fake, divergence=div,
        batch_size=8, batch_gpu=batch_gpu, g_lr=lr, f_lr=lr, total_kimg=kimg, kimg_per_tick=0.008,
        snapshot_ticks=2, seed=3, resume_state=resume_state, grid_size=4, log=lambda *_: None,
        **dict(LEVERS_ON, **levers))

def test_reuse_feeds_the_generator_samples_to_the_fake_update_with_the_same_draws(tmp_path):
    teacher, G, fake, div = _setup('di')
    fake0 = copy.deepcopy(fake)
    seen = {}
    gen_loss, fake_loss = div.generator_loss, div.fake_loss
    def record_gen(teacher_, fake_, x_g, c, rnd, **kw):
        seen['gen'] = (x_g.detach().clone(), c)
        return gen_loss(teacher_, fake_, x_g, c, rnd, **kw)
    def record_fake(fake_, x_g, c, rnd):
        loss = fake_loss(fake_, x_g, c, rnd)
        seen['fake'] = (x_g.clone(), c, loss.detach().clone())
        return loss
    div.generator_loss, div.fake_loss = record_gen, record_fake
    N.set_implementation(dropout='uniform')
    refinement_loop(run_dir=str(tmp_path), teacher=teacher, G=G, fake=fake, divergence=div, batch_size=8,
        total_kimg=0.008, kimg_per_tick=1, snapshot_ticks=None, seed=3, grid_size=4, log=lambda *_: None,
        reuse_samples=True, fused_optim=False, amp='off')
    x_gen, c_gen = seen['gen']
    x_fake, c_fake, loss = seen['fake']
    assert torch.equal(x_fake, x_gen) and torch.equal(c_fake, c_gen)
    # The loss that the update without reuse computes on these samples with its own draws.
    rnd = StreamRandom(3, 0, 'fake0', 8)
    rnd.randn(*G.z_shape), rnd.labels(G.label_dim)
    torch.manual_seed(derive_seed(3, 0, 'fake0', 0, 'dropout'))
    fake0.train()
    assert torch.equal(fake_loss(fake0, x_gen, c_gen, rnd), loss)

def test_reuse_off_keeps_the_fake_update_first_on_its_own_samples(tmp_path):
    teacher, G, fake, div = _setup('di')
    order = []
    gen_loss, fake_loss = div.generator_loss, div.fake_loss
    div.generator_loss = lambda *a, **k: (order.append('gen'), gen_loss(*a, **k))[1]
    div.fake_loss = lambda *a, **k: (order.append('fake'), fake_loss(*a, **k))[1]
    refinement_loop(run_dir=str(tmp_path), teacher=teacher, G=G, fake=fake, divergence=div, batch_size=8,
        total_kimg=0.016, kimg_per_tick=1, snapshot_ticks=None, seed=3, grid_size=4, log=lambda *_: None,
        reuse_samples=False)
    assert order == ['fake', 'gen', 'fake', 'gen']

# Stated tolerances of bf16 autocast against float32, with a fake score 1% away from the
# teacher: the fake score's DSM loss within 2% (relative norm over the batch); the generator
# gradient within 2% of the samples' norm for DI (bf16 forward passes only) and 15% for SiD
# (whose gradient also runs back through both networks in bf16). Both gradients are
# differences of two close networks, so relative to themselves their bf16 error is far larger
# (about half here): docs/performance.md, whose MNIST FD of runs with amp 'all' (8 kimg) shows
# no loss from it, which is why 'auto' means 'all'.
BF16_TOLERANCE = dict(fake_loss=0.02, di_grad_of_sample_norm=0.02, sid_grad_of_sample_norm=0.15)

@pytest.mark.parametrize('divergence', ['di', 'sid'])
def test_bf16_autocast_losses_within_stated_tolerance(divergence):
    teacher, G, fake, div = _setup(divergence, dropout=0)
    with torch.no_grad():
        for p in fake.parameters():
            p.mul_(1 + 0.01 * torch.randn_like(p))
    fake.eval()
    results = {}
    for level in ('off', 'all'):
        levers = speed.Levers('cpu', div, amp=level)
        rnd = StreamRandom(0, 0, 'x', 8)
        z, c = rnd.randn(*G.z_shape), rnd.labels(2)
        with torch.no_grad():
            x = G(z, c)
        x.requires_grad_(True)
        with levers.precision('loss'):
            loss, _ = div.generator_loss(teacher, fake, x, c, StreamRandom(0, 0, 'g', 8))
        with levers.precision('fake'):
            f_loss = div.fake_loss(fake, x.detach(), c, StreamRandom(0, 0, 'f', 8))
        assert loss.dtype == torch.float32 and f_loss.dtype == torch.float32
        grad, = torch.autograd.grad(loss.sum(), x)
        results[level] = loss.detach(), grad, f_loss.detach()
    fake_error = float((results['off'][2] - results['all'][2]).norm() / results['off'][2].norm())
    grad_error = float((results['off'][1] - results['all'][1]).norm() / x.detach().norm())
    relative = float((results['off'][1] - results['all'][1]).norm() / results['off'][1].norm())
    print(f'{divergence}: bf16 error of the fake loss {fake_error:.3g}; of the gradient {grad_error:.3g} '
        f'of the samples\' norm ({relative:.3g} of its own)')
    assert fake_error < BF16_TOLERANCE['fake_loss'] and grad_error < BF16_TOLERANCE[f'{divergence}_grad_of_sample_norm']

def test_amp_levels():
    di, sid = make_divergence('di'), make_divergence('sid')
    enabled = lambda levers, phase: isinstance(levers.precision(phase), torch.autocast)
    assert speed.resolve_amp('auto', 'cpu') == ('all' if speed.bf16_is_fast('cpu') else 'off')
    assert enabled(speed.Levers('cpu', di, amp='nograd'), 'loss') and not enabled(speed.Levers('cpu', sid, amp='nograd'), 'loss')
    assert not enabled(speed.Levers('cpu', di, amp='nograd'), 'fake') and enabled(speed.Levers('cpu', sid, amp='loss'), 'loss')
    assert all(enabled(speed.Levers('cpu', di, amp='all'), phase) for phase in ('loss', 'fake', 'generator'))
    with pytest.raises(ValueError, match='amp'):
        speed.resolve_amp('fp16', 'cpu')

def _final_G(run_dir):
    return torch.load(sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1], weights_only=True)['G']

@pytest.mark.parametrize('levers', [dict(), dict(amp='all', impl=dict(attention='matmul', dropout='uniform',
    recompute=True, channels_last=True))], ids=['defaults+sdpa', 'bf16+channels_last'])
def test_resume_is_exact_with_the_levers_on(tmp_path, levers):
    _loop(tmp_path / 'a', 0.032, **levers)
    _loop(tmp_path / 'b', 0.016, **levers)
    state = sorted(glob.glob(str(tmp_path / 'b' / 'training-state-*.pt')))[-1]
    _loop(tmp_path / 'b', 0.032, resume_state=state, **levers)
    G_a, G_b = _final_G(tmp_path / 'a'), _final_G(tmp_path / 'b')
    assert all(torch.equal(G_a[k], G_b[k]) for k in G_a)

@pytest.mark.slow
def test_compiled_run_writes_the_same_snapshot(tmp_path):
    # Compiled calls run torch's ops (dynamo cannot trace the fused-norm kernel): the plain run too.
    impl = dict(attention='sdpa', dropout='uniform', recompute=True, fused_norm=False, channels_last=False)
    _loop(tmp_path / 'plain', 0.016, impl=impl)
    _loop(tmp_path / 'compiled', 0.016, impl=impl, compile='eager')
    snaps = [sorted(glob.glob(str(tmp_path / d / 'network-snapshot-*.pkl')))[-1] for d in ('plain', 'compiled')]
    plain, loaded = (safe_pickle.load_network_pkl(path) for path in snaps) # the safe loader refuses tensor attributes
    for key in ('G_ema', 'G', 'fake'):
        a, b = plain[key].state_dict(), loaded[key].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(loaded['G_ema']).__name__ == 'OneStepGenerator' and type(loaded['fake']).__name__ == 'EDMPrecond'

def test_torchrun_two_processes_match_one_with_the_levers_on(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
        os.path.abspath(__file__), str(tmp_path / 'two')], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    _loop(tmp_path / 'one', 0.024, batch_gpu=4, lr=1e-5) # the same parts as 2 x 4
    G1, G2 = _final_G(tmp_path / 'one'), _final_G(tmp_path / 'two')
    worst = max(float((G1[k] - G2[k]).abs().max() / G1[k].abs().max().clamp(min=1e-12)) for k in G1)
    assert worst < 1e-5

def test_throughput_bench_times_the_real_loop():
    from tests.scripts import load_script # pylint: disable=import-outside-toplevel
    bench = load_script('bench/throughput.py', 'throughput_bench')
    m = bench.measure('tiny', 'di', batch=4, iters=1, warmup=0, repeats=1, device='cpu', reuse=True,
        preset_overrides=dict(img_resolution=8, channel_mult=[1], attn_resolutions=[]))
    assert set(m['phases_s']) == {'fake', 'generator', 'ema'} and m['iteration_s'] > 0
    assert 'generator forward (no grad)' not in m['passes_s'] # reused
    assert m['pass_sum_s'] > 0 and 'iteration / pass sum' in bench.report(m)

@pytest.mark.slow
def test_gpu_speed_script_smoke_on_cpu():
    out = subprocess.run([sys.executable, 'bench/gpu_speed.py', '--device', 'cpu', '--teacher', 'tiny',
        '--batch', '2', '--iters', '1', '--warmup', '0', '--precisions', 'fp32', '--compile', 'off',
        '--divergences', 'sid', '--no-passes'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'sid        fp32         off' in out.stdout and 'failed' not in out.stdout

def _torchrun_worker(run_dir):
    from torch_utils import distributed # pylint: disable=import-outside-toplevel
    distributed.init()
    torch.set_num_threads(1)
    _loop(run_dir, 0.024, lr=1e-5)

if __name__ == '__main__':
    _torchrun_worker(sys.argv[1])

def test_amp_auto_applies_to_edm_generators_only():
    """refine.py's default amp 'auto' may turn bf16 on for an EDM teacher with an EDM one-step
    generator, and leaves MLP generators on exact mixtures in float32."""
    from refine import run # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    T = teachers.EDMTeacher(N.EDMPrecond(img_resolution=8, img_channels=1, label_dim=0, model_type='SongUNet',
        model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0))
    G, _ = generators.build_generator('teacher', T, sigma_init=1.0)
    gmm = teachers.make_gmm('ring8')
    mlp, _ = generators.build_generator('mlp', gmm)
    assert speed.amp_auto_applies(T, G) and not speed.amp_auto_applies(gmm, mlp)
    assert run.speed_options(dict(amp='auto'), gmm, mlp)['amp'] == 'off'
    assert run.speed_options(dict(amp='auto'), T, G)['amp'] == 'auto' # the loop resolves it per device
    assert run.speed_options(dict(amp='all'), gmm, mlp)['amp'] == 'all' # asked for by name
