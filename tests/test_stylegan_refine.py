"""StyleGAN generators in refine.py: only the selected parameters move, w_avg follows the mapping
network, and the refined snapshot is a StyleGAN pickle that both loaders and generate.py read."""

import copy
import glob
import os

import pytest
import torch
from click.testing import CliRunner

import generate
from torch_utils import persistence, safe_pickle
from training import networks_edm, networks_generators
from training import networks_stylegan2 as sg2
from tests.test_refine_e2e import _load_cli, _run_dir

RES, C_DIM = 16, 2

@persistence.persistent_class
class AugmentPipe(torch.nn.Module):
    """Stands in for ADA's augment_pipe: a class the safe loader does not know."""
    def __init__(self, xflip=1):
        super().__init__()
        self.xflip = xflip
        self.register_buffer('p', torch.tensor(0.25))

def _frozen(module):
    return copy.deepcopy(module).eval().requires_grad_(False)

@pytest.fixture(scope='module')
def pickles(tmp_path_factory):
    root = tmp_path_factory.mktemp('sg')
    torch.manual_seed(0)
    teacher = networks_edm.EDMPrecond(img_resolution=RES, img_channels=1, label_dim=C_DIM,
        model_type='SongUNet', model_channels=8, channel_mult=[1, 1], num_blocks=1,
        attn_resolutions=[], dropout=0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    G = sg2.Generator(z_dim=8, c_dim=C_DIM, w_dim=8, img_resolution=RES, img_channels=1,
        mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=128, channel_max=16))
    with torch.no_grad():
        G.mapping.w_avg.normal_() # as after GAN training
    D = sg2.Discriminator(c_dim=C_DIM, img_resolution=RES, img_channels=1, channel_base=128,
        channel_max=16, epilogue_kwargs=dict(mbstd_group_size=2))
    paths = dict(teacher=str(root / 'teacher.pkl'), gan=str(root / 'gan.pkl'))
    persistence.save_network_pkl(dict(ema=_frozen(teacher)), paths['teacher'])
    persistence.save_network_pkl(dict(G=_frozen(G), D=_frozen(D), G_ema=_frozen(G),
        augment_pipe=AugmentPipe(), training_set_kwargs=dict(path='mnist.zip', use_labels=True)), paths['gan'])
    return paths

def _refine(args):
    result = CliRunner().invoke(_load_cli().main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output

def _refine_gan(pickles, outdir, *extra):
    _refine(['--teacher', pickles['teacher'], '--gen', pickles['gan'], '--outdir', str(outdir),
        '--batch', '4', '--lr', '1e-3', '--glr', '1e-2', '--kimg', '0.008', '--tick', '0.004',
        '--snap', '2', *extra])
    return _run_dir(outdir)

@pytest.mark.parametrize('train_params', ['all', 'synthesis', 'mapping'])
def test_refine_step_changes_only_selected_parameters(pickles, tmp_path, train_params):
    run_dir = _refine_gan(pickles, tmp_path, '--train-params', train_params)
    before = safe_pickle.load_network_pkl(pickles['gan'])['G_ema'].state_dict()
    state = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1]
    after = {k[len('G.'):]: v for k, v in torch.load(state, weights_only=True)['G'].items()}
    assert after.keys() == before.keys()
    params = dict(sg2.Generator(**safe_pickle.load_network_pkl(pickles['gan'])['G_ema'].init_kwargs).named_parameters())
    trained_prefixes = dict(all=('mapping.', 'synthesis.'), synthesis=('synthesis.',), mapping=('mapping.',))[train_params]
    for name in params:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith(trained_prefixes), (name, changed)
    # w_avg tracks the mapping network exactly when that is trained; other buffers never move.
    w_avg_moved = not torch.equal(before['mapping.w_avg'], after['mapping.w_avg'])
    assert w_avg_moved == (train_params != 'synthesis')
    for name in before:
        if name not in params and name != 'mapping.w_avg':
            assert torch.equal(before[name], after[name]), name

def test_snapshot_is_a_stylegan_pickle_for_both_loaders_and_generate(pickles, tmp_path, monkeypatch):
    run_dir = _refine_gan(pickles, tmp_path / 'run', '--noise-mode', 'const')
    snap = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1]
    original = safe_pickle.load_network_pkl(pickles['gan'])
    safe = safe_pickle.load_network_pkl(snap)
    for key in ('G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs'):
        assert key in safe
    assert isinstance(safe['G_ema'], sg2.Generator) and isinstance(safe['G'], sg2.Generator)
    assert safe['generator_options'] == dict(truncation_psi=1.0, noise_mode='const', train_params='all', force_fp32=None)
    assert safe['training_set_kwargs'] == original['training_set_kwargs']
    # D is carried over unchanged; the unknown augment_pipe is carried over as it was.
    assert all(torch.equal(a, b) for a, b in zip(safe['D'].state_dict().values(), original['D'].state_dict().values()))
    assert isinstance(safe['augment_pipe'], safe_pickle.UnknownPersistentObject)
    code = safe_pickle.load_network_pkl(snap, allow_code=True)
    assert type(code['augment_pipe']).__name__ == 'AugmentPipe'
    assert code['augment_pipe'].xflip == 1 and float(code['augment_pipe'].p) == 0.25
    # The refined G_ema differs from the GAN's and gives the same images under both loaders.
    z, c = torch.randn([3, 8]), torch.eye(C_DIM)[[0, 1, 1]]
    out_safe = safe['G_ema'](z, c, noise_mode='const')
    assert torch.equal(out_safe, code['G_ema'](z, c, noise_mode='const'))
    assert not torch.allclose(out_safe, original['G_ema'](z, c, noise_mode='const'))
    # generate.py reads it with the saved options; a second refinement starts from it.
    result = CliRunner().invoke(generate.main, ['--network', snap, '--outdir', str(tmp_path / 'img'),
        '--seeds', '0-3', '--batch', '2'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(os.listdir(tmp_path / 'img')) == 4
    _refine(['--teacher', pickles['teacher'], '--gen', snap, '--outdir', str(tmp_path / 'again'),
        '--batch', '4', '--kimg', '0.004', '--tick', '0.004', '--dry-run'])

def test_wrapper_forward_matches_stylegan_call(pickles):
    G = safe_pickle.load_network_pkl(pickles['gan'])['G_ema']
    wrapped = networks_generators.StyleGANGenerator(G, truncation_psi=0.7, noise_mode='const').eval()
    z, c = torch.randn([2, 8]), torch.eye(C_DIM)[[1, 0]]
    assert torch.equal(wrapped(z, c), G(z, c, truncation_psi=0.7, noise_mode='const', force_fp32=True))
    assert wrapped.z_shape == (8,) and wrapped.out_shape == (1, RES, RES) and wrapped.label_dim == C_DIM
    with pytest.raises(ValueError, match='train_params'):
        networks_generators.StyleGANGenerator(G, train_params='styles')

def test_stylegan_flags_need_a_stylegan_generator(pickles, tmp_path):
    result = CliRunner().invoke(_load_cli().main, ['--teacher', pickles['teacher'], '--gen', 'teacher',
        '--sigma-init', '1', '--train-params', 'synthesis', '--outdir', str(tmp_path)])
    assert result.exit_code != 0 and 'apply to StyleGAN generators' in result.output
    assert 'Traceback' not in result.output

def _final_state(run_dir):
    return torch.load(sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1], weights_only=True)

def test_fake_warmup_trains_only_the_fake_score_first(pickles, tmp_path):
    teacher = safe_pickle.load_network_pkl(pickles['teacher'])['ema'].state_dict()
    gan = safe_pickle.load_network_pkl(pickles['gan'])['G_ema'].state_dict()
    # Warm-up over the whole run (two steps): G bit-identical, the fake score moved off the teacher.
    whole = _final_state(_refine_gan(pickles, tmp_path / 'whole', '--fake-warmup', '0.008'))
    assert all(torch.equal(whole['G'][f'G.{k}'], v) for k, v in gan.items())
    assert any(not torch.equal(whole['fake'][k], v) for k, v in teacher.items() if v.is_floating_point())
    # Warm-up over the first step only: the second step moves G, to a different place than
    # two generator steps take it.
    half = _final_state(_refine_gan(pickles, tmp_path / 'half', '--fake-warmup', '0.004'))
    none = _final_state(_refine_gan(pickles, tmp_path / 'none'))
    assert any(not torch.equal(half['G'][f'G.{k}'], v) for k, v in gan.items() if v.is_floating_point())
    assert half['cur_nimg'] == whole['cur_nimg'] == 8
    assert any(not torch.equal(half['G'][k], none['G'][k]) for k in none['G']) # one G step fewer

def test_resume_equals_an_uninterrupted_run(pickles, tmp_path):
    """StyleGAN's per-pixel noise is drawn from the loop's per-step seeds, so a run stopped
    inside the fake-score warm-up and resumed ends bit-identical to one that never stopped."""
    def run(outdir, kimg):
        return _refine(['--teacher', pickles['teacher'], '--gen', pickles['gan'], '--outdir', str(outdir),
            '--batch', '4', '--lr', '1e-3', '--glr', '1e-2', '--kimg', kimg, '--tick', '0.004',
            '--snap', '1', '--fake-warmup', '0.008'])
    run(tmp_path / 'a', '0.016')
    run(tmp_path / 'b', '0.004')
    run_b = _run_dir(tmp_path / 'b')
    assert 'Resuming' in _refine(['--resume', run_b, '--kimg', '0.016'])
    a, b = _final_state(_run_dir(tmp_path / 'a')), _final_state(run_b)
    assert a['cur_nimg'] == b['cur_nimg'] == 16
    for key in ('G', 'fake'):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    gan = safe_pickle.load_network_pkl(pickles['gan'])['G_ema'].state_dict()
    assert any(not torch.equal(a['G'][f'G.{k}'], v) for k, v in gan.items() if v.is_floating_point())
