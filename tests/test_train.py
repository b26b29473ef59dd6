"""train.py end to end on a tiny network: snapshots and training states, exact resume, and the
snapshot working in generate.py and refine.py; plus the loss formulas and one-line errors."""

import glob
import gzip
import json
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import generate
import train
from refine import run as refine_run
from torch_utils import safe_pickle
from training.loss import EDMLoss, VELoss, VPLoss
from training.networks_edm import EDMPrecond

TINY = ['--cond', '--cbase', 8, '--cres', '1,2', '--blocks', 1, '--attn', '', '--batch', 8,
    '--lr', 1e-2, '--lr-rampup', 0, '--ema', 0.00001, '--tick', 0.016, '--snap', 2, '--dump', 1,
    '--workers', 0, '--seed', 3]

def _cli(main, *args):
    return CliRunner().invoke(main, [str(a) for a in args])

def _one_line_error(result, *words):
    text = result.output
    assert result.exit_code != 0, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in text
    errors = [line for line in text.splitlines() if line.startswith('Error')]
    assert len(errors) == 1, text # click may add usage lines before the one error line
    for word in words:
        assert word in errors[0], text

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """40 labelled 8x8 grayscale images made by dataset_tool from an MNIST-like pickle."""
    root = tmp_path_factory.mktemp('data')
    rng = np.random.RandomState(0)
    parts = tuple((rng.randint(0, 256, size=[n, 784]).astype(np.float32) / 256,
        rng.randint(0, 10, size=[n]).astype(np.int64)) for n in (30, 10, 5))
    with gzip.open(root / 'm.pkl.gz', 'wb') as f:
        pickle.dump(parts, f)
    result = _cli(dataset_tool.main, '--source', f'mnist:{root / "m.pkl.gz"}', '--split', 'train',
        '--resolution', 8, '--dest', root / 'm8.zip')
    assert result.exit_code == 0, result.output
    result = _cli(dataset_tool.main, '--source', f'mnist:{root / "m.pkl.gz"}', '--split', 'test',
        '--resolution', 8, '--dest', root / 'nolabels')
    assert result.exit_code == 0, result.output
    with open(root / 'nolabels' / 'dataset.json', 'w') as f:
        json.dump(dict(labels=None), f)
    return dict(zip=str(root / 'm8.zip'), nolabels=str(root / 'nolabels'), root=root)

def _train(outdir, data, *extra):
    result = _cli(train.main, '--data', data['zip'], '--outdir', outdir, *TINY, *extra)
    assert result.exit_code == 0, result.output
    return glob.glob(os.path.join(outdir, '0*'))[0]

def _state(run_dir):
    return torch.load(sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1], weights_only=True)

@pytest.fixture(scope='module')
def runs(data, tmp_path_factory):
    """An uninterrupted 48-image run, and one stopped at 24 images then resumed to 48."""
    root = tmp_path_factory.mktemp('runs')
    full = _train(root / 'full', data, '--duration', 48e-6)
    part = _train(root / 'part', data, '--duration', 24e-6)
    mid = _state(part)
    result = _cli(train.main, '--resume', part, '--duration', 48e-6)
    assert result.exit_code == 0, result.output
    assert 'Resuming from' in result.output and 'at 0.024 kimg' in result.output
    return dict(full=full, part=part, mid=mid)

def test_resume_is_bit_exact(runs):
    a, b = _state(runs['full']), _state(runs['part'])
    assert a['cur_nimg'] == b['cur_nimg'] == 48 and runs['mid']['cur_nimg'] == 24
    for key in ('net', 'ema'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name}'
    for pa, pb in zip(a['optimizer_state']['state'].values(), b['optimizer_state']['state'].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # ...and training did something: weights moved after the midpoint.
    assert not torch.equal(runs['mid']['net']['model.dec.8x8_aux_conv.weight'],
        a['net']['model.dec.8x8_aux_conv.weight'])

def test_run_directory(runs):
    names = sorted(os.listdir(runs['full']))
    # Ticks of 16 images end inside the first kimg: the names carry the images (no overwrites).
    assert {'network-snapshot-000000_048.pkl', 'samples-000000_048.png', 'stats.jsonl',
        'training-state-000000_048.pt', 'training_options.json', 'log.txt'} <= set(names)
    with open(os.path.join(runs['full'], 'stats.jsonl')) as f:
        records = [json.loads(line) for line in f]
    assert [r['kimg'] for r in records] == [0.016, 0.032, 0.048]
    assert all(np.isfinite(r['Loss/loss']['mean']) and r['img_per_sec'] > 0 for r in records)
    options = json.load(open(os.path.join(runs['full'], 'training_options.json')))
    assert options['network_kwargs']['class_name'] == 'training.networks_edm.EDMPrecond'
    assert options['dataset_kwargs']['resolution'] == 8 and options['dataset_kwargs']['max_size'] == 40

def test_snapshot_safe_loads(runs):
    path = os.path.join(runs['full'], 'network-snapshot-000000_048.pkl')
    data = safe_pickle.load_network_pkl(path)
    assert set(data) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}
    assert isinstance(data['ema'], EDMPrecond) and not data['ema'].training
    assert not any(p.requires_grad for p in data['ema'].parameters())
    assert isinstance(data['loss_fn'], EDMLoss) and data['loss_fn'].P_mean == -1.2
    assert data['augment_pipe'] is None
    assert data['dataset_kwargs']['class_name'] == 'training.dataset.ImageFolderDataset'
    assert data['dataset_kwargs']['use_labels'] is True
    ema = _state(runs['full'])['ema']
    for name, value in data['ema'].state_dict().items():
        assert torch.equal(value, ema[name]), name

def test_snapshot_generates_and_refines(runs, tmp_path):
    path = os.path.join(runs['full'], 'network-snapshot-000000_048.pkl')
    result = _cli(generate.main, '--network', path, '--outdir', tmp_path / 'out', '--seeds', '0-2',
        '--steps', 3, '--class', 4)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'out')) == ['000000.png', '000001.png', '000002.png']

    setup = refine_run.prepare(refine_run.resolve_options(dict(teacher=path, gen='teacher',
        allow_pickle_code=False)))
    assert setup.teacher.label_dim == 10 and list(setup.teacher.shape) == [1, 8, 8]

def test_resume_keeps_options(runs):
    _one_line_error(_cli(train.main, '--resume', runs['full'], '--lr', 1), '--lr', 'keeps its options')
    _one_line_error(_cli(train.main, '--resume', runs['full'] + '/nothing-here'), '--resume')

def test_bad_options(data, tmp_path):
    base = ['--outdir', tmp_path, '--dry-run']
    _one_line_error(_cli(train.main, *base), '--data')
    _one_line_error(_cli(train.main, '--data', data['root'] / 'missing.zip', *base), '--data')
    _one_line_error(_cli(train.main, '--data', data['nolabels'], '--cond', *base), '--cond', 'no labels')
    _one_line_error(_cli(train.main, '--data', data['zip'], '--attn', 32, *base), '--attn', 'level')
    _one_line_error(_cli(train.main, '--data', data['zip'], '--cres', '1,1,1,1,1', *base), '--cres')
    _one_line_error(_cli(train.main, '--data', data['zip'], '--batch', 8, '--batch-gpu', 3, *base), '--batch-gpu')
    result = _cli(train.main, '--data', data['nolabels'], *base)
    assert result.exit_code == 0, result.output
    assert not os.listdir(tmp_path) # a dry run writes nothing

#----------------------------------------------------------------------------
# The loss formulas, written out independently of training/loss.py.

class _Recorder(torch.nn.Module):
    """Returns a fixed guess and records the noisy input and sigma it was called with."""
    def forward(self, x, sigma, labels=None, augment_labels=None):
        self.x, self.sigma = x, sigma
        return torch.full_like(x, 0.25)

@pytest.mark.parametrize('loss_class', [EDMLoss, VPLoss, VELoss])
def test_loss_formulas(loss_class):
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    net = _Recorder()
    torch.manual_seed(7)
    loss = loss_class()(net, images)
    sigma = net.sigma.flatten()

    torch.manual_seed(7) # the same draws: one per image for sigma, then the noise
    if loss_class is EDMLoss:
        expected_sigma = (torch.randn([2, 1, 1, 1]) * 1.2 - 1.2).exp()
        weight = (expected_sigma ** 2 + 0.25) / (expected_sigma * 0.5) ** 2
    elif loss_class is VPLoss:
        t = 1 + torch.rand([2, 1, 1, 1]) * (1e-5 - 1)
        expected_sigma = ((0.5 * 19.9 * t ** 2 + 0.1 * t).exp() - 1).sqrt()
        weight = 1 / expected_sigma ** 2
    else:
        expected_sigma = 0.02 * (100 / 0.02) ** torch.rand([2, 1, 1, 1])
        weight = 1 / expected_sigma ** 2
    noise = torch.randn_like(images) * expected_sigma
    torch.testing.assert_close(sigma, expected_sigma.flatten())
    torch.testing.assert_close(net.x, images + noise)
    torch.testing.assert_close(loss, weight * (0.25 - images) ** 2)
