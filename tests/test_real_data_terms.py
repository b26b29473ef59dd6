"""The optional real-data terms (`refine.py --data`, refine/divergences/adversarial.py): their
losses against the formulas, nothing changed without --data, exact resume and torchrun with
--data, and one-line errors for a dataset that does not fit the teacher."""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from refine import noise, teachers
from refine.divergences import adversarial, make_divergence
from tests import real_data_golden as golden
from tests.scripts import free_port, load_script
from torch_utils.rng import StreamRandom
from training import networks_edm, networks_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
refine_cli = load_script('refine.py', 'refine_cli_real_data')

def _png(array):
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format='png')
    return buffer.getvalue()

def write_dataset(path, n=12, res=8, channels=1, labels=(0, 1), raw=None):
    """A dataset_tool-style ZIP of n random images; labels cycle through `labels` (None: none)."""
    rng = np.random.RandomState(1)
    shape = [res, res] if channels == 1 else [res, res, channels]
    with zipfile.ZipFile(path, 'w') as z:
        for i in range(n):
            data = raw[i] if raw is not None and i in raw else _png(rng.randint(0, 255, shape, dtype=np.uint8))
            z.writestr(f'00000/img{i:08d}.png', data)
        z.writestr('dataset.json', json.dumps(dict(labels=None if labels is None else
            [[f'00000/img{i:08d}.png', labels[i % len(labels)]] for i in range(n)])))
    return str(path)

@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp('realdata')
    teacher = golden.tiny_teacher(str(root / 'teacher.pkl'))
    return dict(root=root, teacher=teacher, data=write_dataset(root / 'data.zip'))

class FixedImages:
    """A stand-in for RealImages: draws indices from the stream like it, returns given tensors."""
    def __init__(self, x, c):
        self.x, self.c, self.path = x, c, 'fixed'
    def __len__(self):
        return self.x.shape[0]
    def draw(self, rnd, device):
        rnd.randint(len(self))
        return self.x, self.c

def tiny_fake(label_dim=2):
    torch.manual_seed(0)
    net = networks_edm.EDMPrecond(img_resolution=8, img_channels=1, label_dim=label_dim, model_type='SongUNet',
        model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net

def features_by_full_forward(fake, x, sigma, c):
    """The last encoder block's output, captured during a complete forward pass."""
    block, out = list(fake.model.enc.values())[-1], []
    handle = block.register_forward_hook(lambda _m, _i, o: out.append(o))
    try:
        fake(x, sigma, c)
    finally:
        handle.remove()
    return out[0]

def wrapped(name, fake, **opts):
    torch.manual_seed(1)
    x_real, c_real = torch.rand(4, 1, 8, 8) * 2 - 1, F.one_hot(torch.tensor([0, 1, 1, 0]), 2).float()
    div = make_divergence(name, data=FixedImages(x_real, c_real), sigma_data=0.5, **opts)
    teacher = teachers.EDMTeacher(tiny_fake())
    div.setup(G=None if name != 'fdiv' else _G(), teacher=teacher, fake=fake)
    return div, teacher, x_real, c_real

def _G():
    class G: # the shapes setup() reads
        out_shape, z_shape, label_dim = (1, 8, 8), (1, 8, 8), 2
    return G()

def log1pexp(a):
    return torch.log1p(torch.exp(a))

@pytest.mark.parametrize('name,head,edm', [('sida', 'mean', True), ('dmd2', 'conv', False)])
def test_discriminator_loss_is_its_formula(name, head, edm):
    fake = tiny_fake()
    div, _, x_real, c_real = wrapped(name, fake)
    assert div.head.kind == head and (div.disc_weighting == 'edm') == edm
    x_g, c = torch.randn(4, 1, 8, 8) * 0.5, F.one_hot(torch.tensor([1, 1, 0, 0]), 2).float()
    got = div.fake_loss(fake, x_g, c, StreamRandom(7, 0, 'fake0', 4)) \
        - div.base.fake_loss(fake, x_g, c, StreamRandom(7, 0, 'fake0', 4))

    rnd = StreamRandom(7, 0, 'fake0', 4)
    div.base.fake_loss(fake, x_g, c, rnd) # the divergence's own draws come first
    rnd.randint(4) # the real images' indices
    sigma = div.disc_sigma.sample(rnd)
    eps = rnd.randn(1, 8, 8)
    s = sigma.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        h_real = features_by_full_forward(fake, x_real + s * eps, sigma, c_real)
        h_fake = features_by_full_forward(fake, x_g + s * eps, sigma, c)
        if head == 'mean':
            l_real, l_fake = h_real.mean(1).flatten(1), h_fake.mean(1).flatten(1)
        else:
            l_real, l_fake = div.head(h_real).reshape(-1, 1), div.head(h_fake).reshape(-1, 1)
    omega = (1 / sigma ** 2 + 1 / 0.25) if edm else torch.ones(4)
    weight = {'sida': 0.5, 'dmd2': 1e-2}[name]
    expected = weight * omega * 64 * (log1pexp(-l_real).mean(1) + log1pexp(l_fake).mean(1))
    assert torch.allclose(got.detach(), expected, rtol=1e-4, atol=1e-6), (got, expected)

@pytest.mark.parametrize('name', ['sida', 'dmd2'])
def test_generator_adversarial_gradient_is_its_formula(name):
    fake = tiny_fake()
    div, teacher, _, _ = wrapped(name, fake)
    fake.eval()
    x_g = (torch.randn(4, 1, 8, 8) * 0.5).requires_grad_(True)
    c = F.one_hot(torch.tensor([1, 0, 0, 1]), 2).float()
    base_loss, _ = div.base.generator_loss(teacher, fake, x_g, c, StreamRandom(3, 0, 'gen', 4))
    loss, stats = div.generator_loss(teacher, fake, x_g, c, StreamRandom(3, 0, 'gen', 4))
    rnd = StreamRandom(3, 0, 'gen', 4)
    div.base.generator_loss(teacher, fake, x_g, c, rnd)
    adv, _ = div.adversarial_loss(teacher, x_g, c, rnd)
    assert torch.allclose(loss, base_loss + adv) # the divergence's loss plus the term
    got, = torch.autograd.grad(adv.sum(), x_g)
    (loss.sum()).backward()
    assert all(p.grad is None for p in list(fake.parameters()) + list(div.head.parameters())) # frozen

    rnd = StreamRandom(3, 0, 'gen', 4)
    div.base.generator_loss(teacher, fake, x_g, c, rnd)
    sigma = (div.base.gen_sigma if name == 'sida' else div.disc_sigma).sample(rnd)
    x_t = (x_g.detach() + sigma.reshape(-1, 1, 1, 1) * rnd.randn(1, 8, 8)).requires_grad_(True)
    h = features_by_full_forward(fake, x_t, sigma, c)
    logit = h.mean(1).flatten(1) if name == 'sida' else div.head(h).reshape(-1, 1)
    bce = log1pexp(-logit).mean(1)
    dbce, = torch.autograd.grad(bce.sum(), x_t)
    if name == 'sida': # 0.01 · n · ∇softplus(−ℓ) / wf
        with torch.no_grad():
            wf = (x_g - teacher(x_t, sigma, c)).abs().flatten(1).mean(1).clamp(min=1e-5)
        expected = 0.01 * 64 * dbce / wf.reshape(-1, 1, 1, 1)
    else: # 3e-3 · n · ∇softplus(−ℓ)
        expected = 3e-3 * 64 * dbce
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max() # float32 rounding (a frozen pass's kernels)
    assert torch.allclose(stats['loss_adv'], bce.detach(), rtol=1e-5)

def test_fdiv_ratio_from_the_discriminator_is_its_logit():
    fake = tiny_fake()
    div, _, _, _ = wrapped('fdiv', fake, ratio='disc')
    assert div.base.head is None and [type(m).__name__ for m in div.trainable_modules()] == ['DiscriminatorHead']
    x_t, sigma, c = torch.randn(4, 1, 8, 8), torch.full([4], 0.7), F.one_hot(torch.tensor([0, 1, 0, 1]), 2).float()
    with torch.no_grad():
        logit = div.head(features_by_full_forward(fake, x_t, sigma, c))
    assert torch.allclose(div.base.log_ratio(x_t, sigma, c), logit, rtol=1e-5, atol=1e-7) # r = D/(1-D) = e^logit
    # Beside the data-free ratio head: both modules, trained in the fake update.
    div2, _, _, _ = wrapped('fdiv', tiny_fake(), ratio='score')
    assert [type(m).__name__ for m in div2.trainable_modules()] == ['NoiseConditionedMLP', 'DiscriminatorHead']

def test_real_batches_follow_the_stream_whatever_the_split(ws):
    images = adversarial.open_images(ws['data'], teachers.load_teacher(ws['teacher']))
    whole = images.draw(StreamRandom(0, 40, 'fake0', 8), 'cpu')
    parts = [images.draw(StreamRandom(0, 40, 'fake0', 8, part=p, parts=2), 'cpu') for p in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0]) and torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    assert whole[0].min() >= -1 and whole[0].max() <= 1 and whole[1].shape == (8, 2)

def test_other_fake_scores_are_a_one_line_error():
    with pytest.raises(ValueError, match='SongUNet or DhariwalUNet'):
        adversarial.bottleneck_block(networks_mlp.MLPDenoiser(dim=2))

#----------------------------------------------------------------------------
# Without --data: nothing changes.

def test_without_data_runs_are_bit_identical_to_the_code_before(ws, tmp_path, monkeypatch):
    """Six tiny data-free runs (every data-free divergence) give the training states that the
    code before the real-data terms gave (tests/data/data_free_golden.json, written by
    tests/real_data_golden.py at 578238f); and the real-data code is never entered."""
    def refuse(*_args, **_kwargs):
        raise AssertionError('real-data code entered without --data')
    monkeypatch.setattr(adversarial, 'open_images', refuse)
    monkeypatch.setattr(adversarial, 'with_real_data', refuse)
    monkeypatch.setattr(adversarial.AdversarialTerms, '__init__', refuse)
    builds = golden.saved_runs()
    saved = next((runs for env, runs in builds if env == golden.environment()), None)
    for name in golden.DIVERGENCES:
        digests = golden.tiny_run(name, str(tmp_path), ws['teacher'])
        assert set(digests) == set(builds[0][1][name]) # no new items in the training state
        if saved is not None:
            assert digests == saved[name], name
    if saved is None:
        pytest.skip(f"bitwise part needs one of {[env for env, _ in builds]} (this is {golden.environment()})")

#----------------------------------------------------------------------------
# With --data: exact resume, torchrun.

BASE = ['--gen', 'teacher', '--batch', '4', '--lr', '1e-3', '--glr', '1e-3', '--tick', '0.004', '--snap', '1', '--seed', '2']

def _refine(args):
    result = CliRunner().invoke(refine_cli.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output

def _final_state(outdir):
    run_dir = sorted(d for d in os.listdir(outdir) if d[0].isdigit())
    assert len(run_dir) == 1
    run_dir = os.path.join(outdir, run_dir[0])
    states = sorted(f for f in os.listdir(run_dir) if f.startswith('training-state-'))
    return torch.load(os.path.join(run_dir, states[-1]), weights_only=True), run_dir

@pytest.mark.parametrize('divergence,opts', [('dmd2', ['--fake-steps', '2']), ('fdiv', ['--fake-steps', '1', '--div-opt', 'ratio=score'])])
def test_resume_with_data_is_exact(ws, tmp_path, divergence, opts):
    args = ['--teacher', ws['teacher'], '--data', ws['data'], '--divergence', divergence, *opts, *BASE]
    _refine([*args, '--outdir', str(tmp_path / 'a'), '--kimg', '0.012'])
    _refine([*args, '--outdir', str(tmp_path / 'b'), '--kimg', '0.004'])
    _, run_b = _final_state(tmp_path / 'b')
    assert 'Resuming' in _refine(['--resume', run_b, '--kimg', '0.012'])
    a, run_a = _final_state(tmp_path / 'a')
    b, _ = _final_state(tmp_path / 'b')
    assert golden.digest_state(a) == golden.digest_state(b)
    assert a['divergence_modules'] and 'loss_disc' in open(os.path.join(run_a, 'stats.jsonl')).read()
    options = json.load(open(os.path.join(run_a, 'options.json')))
    assert options['data'] == ws['data']

def test_two_processes_equal_one_with_the_same_split(ws, tmp_path):
    args = ['--teacher', ws['teacher'], '--data', ws['data'], '--divergence', 'sida', '--kimg', '0.016',
        '--gen', 'teacher', '--batch', '8', '--lr', '1e-3', '--glr', '1e-3', '--tick', '0.008', '--snap', '2', '--seed', '4']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    one = subprocess.run([sys.executable, 'refine.py', '--outdir', str(tmp_path / 'one'), '--batch-gpu', '4', *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
        f'--master_port={free_port()}', 'refine.py', '--outdir', str(tmp_path / 'two'), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert 'over 2 process(es), 1 round(s) of 4' in two.stdout and '2 round(s) of 4' in one.stdout
    s1, _ = _final_state(tmp_path / 'one')
    s2, _ = _final_state(tmp_path / 'two')
    for key in ('G', 'fake', 'G_ema'):
        assert s1[key].keys() == s2[key].keys()
        assert all(torch.equal(s1[key][k], s2[key][k]) for k in s1[key]), key
    start = teachers.load_teacher(ws['teacher']).net.state_dict()
    assert any(not torch.equal(s1['G']['net.' + k], v) for k, v in start.items()) # it trained

#----------------------------------------------------------------------------
# A dataset that does not fit: one line, before any work, no run folder.

@pytest.fixture(scope='module')
def bad(ws):
    root = ws['root']
    good = write_dataset(root / 'good-for-bad.zip')
    raw = open(good, 'rb').read()
    (root / 'truncated.zip').write_bytes(raw[:len(raw) // 2])
    png = _png(np.zeros([8, 8], np.uint8))
    write_dataset(root / 'corrupt.zip', raw={3: png[:len(png) // 2]})
    write_dataset(root / 'res16.zip', res=16)
    write_dataset(root / 'rgb.zip', channels=3)
    write_dataset(root / 'unlabelled.zip', labels=None)
    write_dataset(root / 'classes3.zip', labels=(0, 1, 2))
    write_dataset(root / 'mixed.zip', raw={2: _png(np.zeros([16, 16], np.uint8))})
    return root

CASES = [
    (['--data', '{ws}/missing.zip'], 'missing.zip'),
    (['--data', '{ws}/truncated.zip'], 'truncated.zip'),
    (['--data', '{ws}/corrupt.zip'], 'img00000003.png'),
    (['--data', '{ws}/mixed.zip'], 'img00000002.png'),
    (['--data', '{ws}/res16.zip'], '16x16'),
    (['--data', '{ws}/rgb.zip'], '3 channel'),
    (['--data', '{ws}/unlabelled.zip'], 'no labels'),
    (['--data', '{ws}/classes3.zip'], 'class 2'),
    (['--divergence', 'sida'], '--data'),
    (['--divergence', 'dmd2'], '--data'),
    (['--divergence', 'fdiv', '--div-opt', 'ratio=disc'], '--data'),
    (['--div-opt', 'gan_weight=0.1'], '--data'),
    (['--data', '{ws}/good-for-bad.zip', '--div-opt', 'gan_head=huge'], 'gan_head'),
    (['--data', '{ws}/good-for-bad.zip', '--divergence', 'vardiu'], 'fake score'),
]

@pytest.mark.parametrize('args,word', CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_dataset_is_one_line_error_before_any_work(ws, bad, args, word):
    out = bad / 'runs'
    argv = ['--teacher', ws['teacher'], '--outdir', str(out), '--batch', '4', '--kimg', '0.004'] + \
        [a.replace('{ws}', str(bad)) for a in args]
    result = CliRunner().invoke(refine_cli.main, argv)
    text = result.output
    assert result.exit_code not in (0, None), text
    assert 'Traceback' not in text and 'internal error' not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('Error: ')]
    assert len(errors) == 1 and lines[-1] == errors[0], text
    assert word in errors[0], text
    assert not out.exists() or not os.listdir(out), 'a run folder was made'

def test_vector_teacher_with_data_is_one_line_error(bad):
    result = CliRunner().invoke(refine_cli.main, ['--teacher', 'gmm:ring8', '--gen', 'mlp', '--outdir',
        str(bad / 'runs'), '--data', str(bad / 'good-for-bad.zip')])
    assert result.exit_code not in (0, None) and 'image teacher' in result.output.strip().splitlines()[-1], result.output

#----------------------------------------------------------------------------
# The loop's hook for divergence-owned modules: a phase and a learning rate per module.

def test_modules_in_both_updates_get_one_optimizer_each_and_resume_exactly(ws, tmp_path):
    """A divergence owning a generator-update module and (with --data) the fake-update head:
    two extra optimizers, saved as a list, and a resume that reproduces the uninterrupted run."""
    from refine import run # pylint: disable=import-outside-toplevel
    from refine.divergences.di import DiffInstruct # pylint: disable=import-outside-toplevel

    class Scaled(DiffInstruct): # DI with a learnt (generator-update) scale on its loss
        module_phase = 'generator'
        def setup(self, G, teacher, fake=None):
            self.scale = torch.nn.Linear(1, 1)
        def trainable_modules(self):
            return [self.scale]
        def generator_loss(self, teacher, fake, x_g, labels, rnd, **kwargs):
            loss, stats = super().generator_loss(teacher, fake, x_g, labels, rnd)
            return loss * (1 + 0.1 * torch.tanh(self.scale(torch.ones(1, 1)))).reshape(()), stats

    def one_run(outdir, kimg, resume=None):
        o = run.resolve_options(dict(teacher=ws['teacher'], gen='teacher', divergence='di', batch=4, lr=1e-3,
            glr=1e-3, kimg=kimg, tick=0.004, snap=1, seed=6, data=ws['data'], allow_pickle_code=False))
        torch.manual_seed(o.seed)
        setup = run.prepare(o)
        base = Scaled(sigma_data=0.5)
        setup.divergence = adversarial.with_real_data(base, setup.divergence.images)
        os.makedirs(outdir, exist_ok=True)
        run.launch(setup, str(outdir), resume_state=resume, log=lambda *_: None)
        states = sorted(f for f in os.listdir(outdir) if f.startswith('training-state-'))
        return os.path.join(outdir, states[-1])

    a = torch.load(one_run(tmp_path / 'a', 0.012), weights_only=True)
    mid = one_run(tmp_path / 'b', 0.004)
    b = torch.load(one_run(tmp_path / 'b', 0.012, resume=mid), weights_only=True)
    assert isinstance(a['x_opt'], list) and len(a['x_opt']) == 2 and len(a['divergence_modules']) == 2
    assert golden.digest_state(a) == golden.digest_state(b)

def test_fdiv_takes_the_published_ratio_with_data_only():
    from refine import run # pylint: disable=import-outside-toplevel
    with_data = run.resolve_options(dict(teacher='edm.pkl', gen='teacher', divergence='fdiv', data='d.zip'))
    assert with_data.div_opt == dict(ratio='disc')
    assert run.resolve_options(dict(teacher='edm.pkl', gen='teacher', divergence='fdiv')).div_opt == {}
    chosen = run.resolve_options(dict(teacher='edm.pkl', gen='teacher', divergence='fdiv', data='d.zip', div_opt=dict(ratio='score')))
    assert chosen.div_opt == dict(ratio='score')
