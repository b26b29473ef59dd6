"""refine.api.refine: a user's own torch.nn.Module distilled from a tiny EDM teacher, its
snapshots (generate.py, code allowed), exact resume by passing a new module of the same class,
and one-line errors for modules that cannot work with the teacher."""

import glob
import json
import os

import pytest
import torch
from click.testing import CliRunner

import generate
from refine import api
from tests.scripts import load_script
from torch_utils import persistence, safe_pickle
from training import networks_edm, networks_generators

@persistence.persistent_class
class SmallConvGenerator(torch.nn.Module):
    """A user's conditional generator: z [N, 2, 8, 8] and one-hot c -> images [N, 1, 8, 8] in [-1, 1]."""
    def __init__(self, label_dim=2, z_channels=2, channels=8, resolution=8):
        super().__init__()
        self.z_shape = (z_channels, resolution, resolution)
        self.label_dim = label_dim
        self.embed = torch.nn.Linear(label_dim, z_channels) if label_dim else None
        self.conv1 = torch.nn.Conv2d(z_channels, channels, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, z, c=None):
        h = z if self.embed is None else z + self.embed(c)[:, :, None, None]
        return torch.tanh(self.conv2(torch.nn.functional.silu(self.conv1(h))))

@pytest.fixture(scope='module')
def teacher_pkl(tmp_path_factory):
    torch.manual_seed(0)
    net = networks_edm.EDMPrecond(img_resolution=8, img_channels=1, label_dim=2, model_type='SongUNet',
        model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pkl'
    persistence.save_network_pkl(dict(ema=net.eval().requires_grad_(False)), path)
    return str(path)

# 2 iterations of 4 samples, one per tick, a snapshot and a state every tick.
OPTIONS = dict(batch=4, lr=1e-3, glr=1e-3, tick=0.004, snap=1, seed=1)

def _new_generator(seed):
    torch.manual_seed(seed)
    return SmallConvGenerator()

def _last(run_dir, pattern):
    found = sorted(glob.glob(os.path.join(run_dir, pattern)))
    assert found, pattern
    return found[-1]

def test_module_distils_snapshots_and_resumes_exactly(teacher_pkl, tmp_path):
    user = _new_generator(0)
    before = {k: v.clone() for k, v in user.state_dict().items()}
    run_a = api.refine(generator=user, teacher=teacher_pkl, outdir=tmp_path / 'a', kimg=0.008, **OPTIONS)
    assert os.path.isdir(run_a) and os.path.basename(run_a).endswith('gen_SmallConvGenerator')
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items()) # the caller's module is untouched
    with open(os.path.join(run_a, 'options.json'), encoding='utf-8') as f:
        assert json.load(f)['gen'] == f'python:{__name__}.SmallConvGenerator'
    assert 'tick 2' in open(os.path.join(run_a, 'log.txt'), encoding='utf-8').read()

    # Stopped after one iteration, resumed with a new module of the class (other initial weights).
    run_b = api.refine(generator=_new_generator(0), teacher=teacher_pkl, outdir=tmp_path / 'b', kimg=0.004, **OPTIONS)
    assert api.refine(generator=_new_generator(5), resume=run_b, kimg=0.008) == run_b
    states = [torch.load(_last(r, 'training-state-*.pt'), weights_only=True) for r in (run_a, run_b)]
    for key in ('G', 'G_ema', 'fake'):
        assert states[0][key].keys() == states[1][key].keys()
        assert all(torch.equal(states[0][key][k], states[1][key][k]) for k in states[0][key]), key
    assert states[0]['cur_nimg'] == states[1]['cur_nimg'] == 8
    assert any(not torch.equal(states[0]['G']['net.' + k], v) for k, v in before.items()) # it trained

    # The snapshot carries the module (with its source): loading it runs that code, so only when
    # allowed; the safe loader says so in one line.
    snap = _last(run_a, 'network-snapshot-*.pkl')
    with pytest.raises(safe_pickle.UnsafePickleError) as info:
        safe_pickle.load_network_pkl(snap)
    assert 'allow-pickle-code' in str(info.value) and '\n' not in str(info.value)
    data = safe_pickle.load_network_pkl(snap, allow_code=True)
    assert isinstance(data['G_ema'], networks_generators.ModuleGenerator)
    assert type(data['G_ema'].net).__name__ == 'SmallConvGenerator' and data['G_ema'].z_shape == (2, 8, 8)
    assert all(torch.equal(v, states[0]['G_ema'][k]) for k, v in data['G_ema'].state_dict().items())
    result = CliRunner().invoke(generate.main, ['--network', snap, '--outdir', str(tmp_path / 'img'),
        '--seeds', '0-3', '--batch', '2', '--allow-pickle-code'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(glob.glob(str(tmp_path / 'img' / '*.png'))) == 4

    # Resuming by rebuilding the module from the snapshot's code: only when allowed.
    with pytest.raises(ValueError, match='pass generator= a new module of that class'):
        api.refine(resume=run_a, kimg=0.012)
    api.refine(resume=run_a, kimg=0.012, allow_code=True)
    assert torch.load(_last(run_a, 'training-state-*.pt'), weights_only=True)['cur_nimg'] == 12

    # refine.py cannot supply the module: one line pointing to Python.
    result = CliRunner().invoke(load_script('refine.py', 'refine_cli_api').main, ['--resume', run_b, '--kimg', '0.012'])
    assert result.exit_code != 0 and 'resume it from Python' in result.output and 'Traceback' not in result.output

    # A module of another class, or of the class with other arguments, does not fit the run.
    with pytest.raises(ValueError, match=f'trains {__name__}.SmallConvGenerator, but generator is a {__name__}._Unconditional'):
        api.refine(generator=_Unconditional(), resume=run_b, kimg=0.012)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r'^generator does not fit .*other shape conv1.bias, conv1.weight') as info:
        api.refine(generator=SmallConvGenerator(channels=4), resume=run_b, kimg=0.012)
    assert '\n' not in str(info.value)

class _Unconditional(torch.nn.Module):
    z_dim = 64
    def forward(self, z, c=None):
        return z.reshape(-1, 1, 8, 8)

class _WrongShape(_Unconditional):
    label_dim = 2
    def forward(self, z, c=None):
        return z.reshape(-1, 4, 4, 4)

class _NoLatent(torch.nn.Module):
    label_dim = 2
    def forward(self, z, c=None):
        return z

class _Failing(_Unconditional):
    label_dim = 2
    def forward(self, z, c=None):
        raise RuntimeError('mat1 and mat2 shapes cannot be multiplied\n(more detail)')

class _IntOutput(_WrongShape):
    def forward(self, z, c=None):
        return z.reshape(-1, 1, 8, 8).long()

class _Unpicklable(_WrongShape):
    def __init__(self):
        super().__init__()
        self.hook = lambda x: x
    def forward(self, z, c=None):
        return self.hook(z.reshape(-1, 1, 8, 8))

@pytest.mark.parametrize('generator, message', [
    ('not a module', 'generator must be a torch.nn.Module, got str'),
    (torch.nn.Linear(2, 2), 'generator Linear needs z_shape (a tuple of positive ints'),
    (_NoLatent(), 'generator _NoLatent needs z_shape'),
    (_Unconditional(), 'generator _Unconditional has label_dim 0, the teacher 2 classes'),
    (_WrongShape(), 'generator _WrongShape(z, c) makes samples of shape (4, 4, 4), the teacher expects (1, 8, 8)'),
    (_Failing(), 'generator _Failing(z, c) failed on z of shape (2, 64): mat1 and mat2 shapes cannot be multiplied'),
    (_IntOutput(), 'generator _IntOutput(z, c) must return a float tensor, got Tensor of torch.int64'),
    (_Unpicklable(), 'generator _Unpicklable cannot be pickled into snapshots'),
])
def test_bad_module_is_a_one_line_error(teacher_pkl, tmp_path, generator, message):
    with pytest.raises(ValueError) as info:
        api.refine(generator=generator, teacher=teacher_pkl, outdir=tmp_path, kimg=0.004, **OPTIONS)
    assert message in str(info.value) and '\n' not in str(info.value), str(info.value)
    assert not os.listdir(tmp_path) # nothing was started

def test_declared_out_shape_and_main_classes_are_checked(teacher_pkl, tmp_path):
    gen = _new_generator(0)
    gen.out_shape = (1, 16, 16)
    with pytest.raises(ValueError, match=r'declares out_shape \(1, 16, 16\), the teacher expects \(1, 8, 8\)$'):
        api.refine(generator=gen, teacher=teacher_pkl, outdir=tmp_path, kimg=0.004)
    main_class = type('FromAScript', (_WrongShape,), dict(__module__='__main__',
        forward=lambda self, z, c=None: z.reshape(-1, 1, 8, 8)))
    with pytest.raises(ValueError, match='defined in __main__, so snapshots could not be loaded elsewhere'):
        api.refine(generator=main_class(), teacher=teacher_pkl, outdir=tmp_path, kimg=0.004)
    with pytest.raises(ValueError, match="unknown option.*gen_lr; the options are refine.py's flags"):
        api.refine(generator=gen, teacher=teacher_pkl, outdir=tmp_path, gen_lr=1e-3)
    with pytest.raises(ValueError, match='only kimg, max_minutes may be given'):
        api.refine(resume=tmp_path, batch=8)
    assert not os.listdir(tmp_path)
