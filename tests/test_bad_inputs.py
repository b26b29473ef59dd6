"""A clumsy user's battery: every mistake ends in one `Error:` line naming the flag or file, with
no traceback, no run folder left behind and every file written earlier intact.

Each case runs a CLI in-process (click's runner) on small fixtures. The workspace holds an
earlier run folder and a sentinel file whose bytes must not change whatever a case does.
"""

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import fid
import generate
from torch_utils import persistence
from training import networks_edm
from tests.scripts import load_script

refine_cli = load_script('refine.py', 'refine_cli_bad_inputs')
train_cli = load_script('train.py', 'train_cli_bad_inputs')

CLIS = dict(refine=refine_cli.main, generate=generate.main, fid=fid.main, train=train_cli.main,
    dataset_tool=dataset_tool.main)

#----------------------------------------------------------------------------
# The workspace: fixtures every case may point at.

def _png_bytes(array):
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format='png')
    return buffer.getvalue()

def _write_dataset_zip(path, images, labels=None):
    with zipfile.ZipFile(path, 'w') as z:
        for i, image in enumerate(images):
            z.writestr(f'00000/img{i:08d}.png', image if isinstance(image, bytes) else _png_bytes(image))
        z.writestr('dataset.json', json.dumps(dict(labels=None if labels is None else
            [[f'00000/img{i:08d}.png', int(l)] for i, l in enumerate(labels)])))

@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp('ws')
    torch.manual_seed(0)
    net = networks_edm.EDMPrecond(img_resolution=8, img_channels=1, label_dim=2, model_type='SongUNet',
        model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    persistence.save_network_pkl(dict(ema=net.eval().requires_grad_(False)), root / 'teacher.pkl')
    net16 = networks_edm.EDMPrecond(img_resolution=16, img_channels=1, label_dim=2, model_type='SongUNet',
        model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    persistence.save_network_pkl(dict(ema=net16.eval().requires_grad_(False)), root / 'teacher16.pkl')
    data = (root / 'teacher.pkl').read_bytes()
    (root / 'truncated.pkl').write_bytes(data[:len(data) // 2])
    torch.save(dict(a=torch.zeros(3)), root / 'state.pt')
    (root / 'text.txt').write_text('not a pickle\n')
    (root / 'afile').write_text('a file where a folder should be\n')
    (root / 'notes.npz').write_bytes(b'PK\x03\x04 not really a zip')

    rng = np.random.RandomState(0)
    images = [rng.randint(0, 255, [8, 8], dtype=np.uint8) for _ in range(6)]
    _write_dataset_zip(root / 'data.zip', images, labels=[0, 1, 0, 1, 0, 1])
    _write_dataset_zip(root / 'unlabelled.zip', images)
    raw = (root / 'data.zip').read_bytes()
    (root / 'truncated.zip').write_bytes(raw[:len(raw) // 2])
    _write_dataset_zip(root / 'mixed.zip', images[:3] + [rng.randint(0, 255, [16, 16], dtype=np.uint8)])
    good = _png_bytes(images[0])
    _write_dataset_zip(root / 'corrupt.zip', images[:3] + [good[:len(good) // 2]])
    _write_dataset_zip(root / 'garbage.zip', images[:3] + [b'\x89PNG not an image at all'])
    with zipfile.ZipFile(root / 'empty.zip', 'w') as z:
        z.writestr('readme.txt', 'no images')

    folder = root / 'images'
    folder.mkdir()
    for i in range(3):
        PIL.Image.fromarray(images[i]).save(folder / f'{i}.png')
    odd = root / 'nonsquare'
    odd.mkdir()
    PIL.Image.fromarray(np.zeros([8, 6], np.uint8)).save(odd / 'a.png')
    broken = root / 'brokenimages'
    broken.mkdir()
    PIL.Image.fromarray(images[0]).save(broken / 'a.png')
    (broken / 'b.png').write_bytes(good[:len(good) // 2])
    mixed = root / 'mixedimages'
    mixed.mkdir()
    PIL.Image.fromarray(images[0]).save(mixed / 'a.png')
    PIL.Image.fromarray(np.zeros([16, 16], np.uint8)).save(mixed / 'b.png')
    badjson = root / 'badjson'
    badjson.mkdir()
    PIL.Image.fromarray(images[0]).save(badjson / 'a.png')
    (badjson / 'dataset.json').write_text('{"labels": [["a.png"')
    full = root / 'fulldest'
    full.mkdir()
    (full / 'x').write_text('taken')
    with gzip.open(root / 'mnist-garbage.pkl.gz', 'wb') as f:
        f.write(b'not a pickle at all')
    with gzip.open(root / 'mnist-wrong.pkl.gz', 'wb') as f:
        pickle.dump((1, 2, 3), f)

    # Training-state fixtures for --resume, and a finished short run to resume.
    (root / 'norun').mkdir()
    (root / 'noopts').mkdir()
    torch.save(dict(a=1), root / 'noopts' / 'training-state-000000.pt')
    runner = CliRunner()
    result = runner.invoke(refine_cli.main, ['--teacher', str(root / 'teacher.pkl'), '--outdir', str(root / 'runs'),
        '--batch', '4', '--kimg', '0.008', '--tick', '0.004', '--snap', '1'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = root / 'runs' / sorted(os.listdir(root / 'runs'))[0]
    hostile = root / 'hostilerun'
    shutil.copytree(run_dir, hostile)
    opts = json.loads((hostile / 'options.json').read_text())
    opts['lr'] = 'fast'
    (hostile / 'options.json').write_text(json.dumps(opts))
    unknown = root / 'unknownrun'
    shutil.copytree(run_dir, unknown)
    opts = json.loads((unknown / 'options.json').read_text())
    opts['class_name'] = 'subprocess.Popen'
    (unknown / 'options.json').write_text(json.dumps(opts))
    cut = root / 'truncatedrun'
    shutil.copytree(run_dir, cut)
    for name in os.listdir(cut):
        if name.startswith('training-state'):
            data = (cut / name).read_bytes()
            (cut / name).write_bytes(data[:len(data) // 3])
    (root / 'sentinel.txt').write_text('written earlier; must survive every case\n')
    return root

def _fingerprint(root):
    """{relative path: sha1} of every file under root, except fresh scratch folders."""
    prints = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                prints[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return prints

#----------------------------------------------------------------------------
# The cases: (cli, arguments with {ws} for the workspace, a word the message must contain).

T = ['--teacher', '{ws}/teacher.pkl']
O = ['--outdir', '{ws}/out']
R = T + O + ['--batch', '4', '--kimg', '0.004']

CASES = [
    # refine.py: required inputs and bad files
    ('refine', O, '--teacher'),
    ('refine', ['--teacher', '{ws}/missing.pkl'] + O, 'missing.pkl'),
    ('refine', ['--teacher', '{ws}/truncated.pkl'] + O, 'truncated.pkl'),
    ('refine', ['--teacher', '{ws}/state.pt'] + O, 'torch.save'),
    ('refine', ['--teacher', '{ws}/text.txt'] + O, 'text.txt'),
    ('refine', ['--teacher', '{ws}/images'] + O, 'images'),
    ('refine', ['--teacher', 'gmm:nosuchpreset'] + O, 'nosuchpreset'),
    ('refine', T + ['--gen', '{ws}/truncated.pkl'] + O, 'truncated.pkl'),
    ('refine', T + ['--gen', '{ws}/missing.pkl'] + O, 'missing.pkl'),
    ('refine', T + ['--gen', '{ws}/teacher16.pkl', '--sigma-init', '1'] + O, '16'),
    ('refine', T, '--outdir'),
    # numbers
    ('refine', R + ['--lr', 'nan'], '--lr'),
    ('refine', R + ['--lr', 'inf'], '--lr'),
    ('refine', R + ['--glr', 'inf'], '--glr'),
    ('refine', R + ['--lr', '-1'], '--lr'),
    ('refine', R + ['--lr', 'abc'], '--lr'),
    ('refine', T + O + ['--kimg', 'nan'], '--kimg'),
    ('refine', R + ['--tick', '0'], '--tick'),
    ('refine', R + ['--sigma-init', 'nan'], '--sigma-init'),
    ('refine', R + ['--ema', '-1'], '--ema'),
    ('refine', R + ['--fake-steps', '0'], '--fake-steps'),
    ('refine', R + ['--max-minutes', '0'], '--max-minutes'),
    ('refine', R + ['--truncation', 'nan'], '--truncation'),
    ('refine', T + O + ['--batch', '0'], '--batch'),
    ('refine', R + ['--compile', 'a b'], '--compile'),
    ('refine', R + ['--amp', 'fp8'], '--amp'),
    ('refine', R + ['--attention', 'flash'], '--attention'),
    ('refine', T + O + ['--batch', '10', '--batch-gpu', '4'], '--batch-gpu'),
    ('refine', ['--teacher', 'gmm:ring8', '--gen', 'mlp', '--divergence', 'vardiu', '--batch', '7'] + O, 'even'),
    # divergences and their options
    ('refine', R + ['--divergence', 'nope'], '--divergence'),
    ('refine', R + ['--divergence', 'sid', '--div-opt', 'alpha=abc'], 'alpha'),
    ('refine', R + ['--divergence', 'sid', '--div-opt', 'alpha=true'], 'alpha'),
    ('refine', R + ['--divergence', 'sid', '--div-opt', 'alpha=nan'], 'alpha'),
    ('refine', R + ['--div-opt', 'nokey=1'], 'nokey'),
    ('refine', R + ['--div-opt', '=3'], '--div-opt'),
    ('refine', R + ['--div-opt', 'justtext'], '--div-opt'),
    ('refine', R + ['--div-opt', 'sigma_data=1'], 'sigma_data'),
    ('refine', R + ['--div-opt', 'fake_steps=2'], '--fake-steps'),
    ('refine', R + ['--divergence', 'sid', '--div-opt', 'tmax=5000'], 'tmax'),
    ('refine', R + ['--divergence', 'di', '--div-opt', 'weighting=cubic'], 'weighting'),
    ('refine', R + ['--divergence', 'vardiu', '--div-opt', 'antithetic=maybe'], 'antithetic'),
    # output folders
    ('refine', R[:2] + ['--outdir', '{ws}/afile'], 'afile'),
    ('refine', R[:2] + ['--outdir', '{ws}/afile/under'], 'afile'),
    ('refine', R + ['--truncation', '0.7'], '--truncation'),
    # metrics: checked before any work
    ('refine', R + ['--metrics', 'fd10k'], '--metric-ref'),
    ('refine', R + ['--metrics', 'bogus'], 'bogus'),
    ('refine', R + ['--metrics', 'fd10k', '--metric-ref', '{ws}/missing.npz'], 'missing.npz'),
    ('refine', R + ['--metrics', 'fd10k', '--metric-ref', '{ws}/notes.npz'], 'notes.npz'),
    ('refine', R + ['--metrics', 'fd10k', '--metric-ref', '{ws}/empty.zip'], 'empty.zip'),
    ('refine', ['--teacher', 'gmm:ring8', '--gen', 'mlp', '--metrics', 'fd10k', '--metric-ref', '{ws}/data.zip'] + O, 'vectors'),
    # resume
    ('refine', ['--resume', '{ws}/missing'], '--resume'),
    ('refine', ['--resume', '{ws}/norun'], 'training-state'),
    ('refine', ['--resume', '{ws}/noopts'], 'options.json'),
    ('refine', ['--resume', '{ws}/hostilerun'], 'lr'),
    ('refine', ['--resume', '{ws}/unknownrun'], 'class_name'),
    ('refine', ['--resume', '{ws}/truncatedrun'], 'truncated'),
    ('refine', ['--resume', '{ws}/state.pt'], 'options.json'),

    # generate.py
    ('generate', ['--network', '{ws}/missing.pkl', '--outdir', '{ws}/gen'], 'missing.pkl'),
    ('generate', ['--network', '{ws}/truncated.pkl', '--outdir', '{ws}/gen'], 'truncated.pkl'),
    ('generate', ['--network', '{ws}/state.pt', '--outdir', '{ws}/gen'], 'torch.save'),
    ('generate', ['--network', '{ws}/text.txt', '--outdir', '{ws}/gen'], 'text.txt'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--seeds', 'a-b'], '--seeds'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--seeds', '-1'], '--seeds'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--rho', 'nan'], '--rho'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--sigma_min', 'nan'], '--sigma'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--sigma_min', '10', '--sigma_max', '1'], '--sigma-min'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--S_churn', '-1'], 'churn'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--S_max', 'nan'], '-max'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--S_noise', 'inf'], '-noise'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--steps', '0'], '--steps'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--batch', '0'], '--batch'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--sigma-init', '-1'], '--sigma-init'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--class', '5'], '--class'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/afile'], 'afile'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--grid', '{ws}/afile/grid.png'], 'afile'),
    ('generate', ['--network', '{ws}/teacher.pkl', '--outdir', '{ws}/gen', '--grid', '{ws}/images'], '--grid'),
    ('generate', ['--outdir', '{ws}/gen'], '--network'),

    # fid.py
    ('fid', ['ref', '--data', '{ws}/missing.zip', '--dest', '{ws}/r.npz', '--detector', 'fast'], 'missing.zip'),
    ('fid', ['ref', '--data', '{ws}/truncated.zip', '--dest', '{ws}/r.npz', '--detector', 'fast'], 'truncated.zip'),
    ('fid', ['ref', '--data', '{ws}/corrupt.zip', '--dest', '{ws}/r.npz', '--detector', 'fast'], 'img00000003.png'),
    ('fid', ['ref', '--data', '{ws}/garbage.zip', '--dest', '{ws}/r.npz', '--detector', 'fast'], 'img00000003.png'),
    ('fid', ['ref', '--data', '{ws}/empty.zip', '--dest', '{ws}/r.npz', '--detector', 'fast'], 'empty.zip'),
    ('fid', ['ref', '--data', '{ws}/data.zip', '--dest', '{ws}/afile/r.npz', '--detector', 'fast'], 'afile'),
    ('fid', ['ref', '--data', '{ws}/data.zip', '--dest', '{ws}/r.npz', '--detector', 'nope'], '--detector'),
    ('fid', ['ref', '--data', '{ws}/data.zip', '--dest', '{ws}/r.npz', '--batch', '0'], '--batch'),
    ('fid', ['calc', '--ref', '{ws}/notes.npz'], '--images'),
    ('fid', ['calc', '--images', '{ws}/images', '--network', '{ws}/teacher.pkl', '--ref', '{ws}/notes.npz'], '--network'),
    ('fid', ['calc', '--images', '{ws}/missing', '--ref', '{ws}/notes.npz'], 'missing'),
    ('fid', ['calc', '--images', '{ws}/images', '--ref', '{ws}/missing.npz', '--detector', 'fast'], 'missing.npz'),
    ('fid', ['calc', '--images', '{ws}/images', '--ref', '{ws}/notes.npz', '--detector', 'fast'], 'notes.npz'),
    ('fid', ['calc', '--images', '{ws}/images', '--ref', '{ws}/data.zip', '--metrics', 'bogus'], 'bogus'),
    ('fid', ['calc', '--network', '{ws}/truncated.pkl', '--ref', '{ws}/data.zip', '--detector', 'fast'], 'truncated.pkl'),
    ('fid', ['calc', '--network', '{ws}/teacher.pkl', '--ref', '{ws}/data.zip', '--num', '1'], '--num'),
    ('fid', ['calc', '--network', '{ws}/teacher.pkl', '--ref', '{ws}/data.zip', '--seeds', 'x'], '--seeds'),
    ('fid', ['calc', '--network', '{ws}/teacher.pkl', '--ref', '{ws}/data.zip', '--sigma-init', 'nan'], '--sigma-init'),

    # train.py
    ('train', ['--outdir', '{ws}/out'], '--data'),
    ('train', ['--data', '{ws}/missing.zip', '--outdir', '{ws}/out'], 'missing.zip'),
    ('train', ['--data', '{ws}/truncated.zip', '--outdir', '{ws}/out'], 'truncated.zip'),
    ('train', ['--data', '{ws}/mixed.zip', '--outdir', '{ws}/out'], 'img00000003.png'),
    ('train', ['--data', '{ws}/corrupt.zip', '--outdir', '{ws}/out'], 'img00000003.png'),
    ('train', ['--data', '{ws}/data.zip', '--outdir', '{ws}/afile'], 'afile'),
    ('train', ['--data', '{ws}/data.zip', '--outdir', '{ws}/afile/under'], 'afile'),
    ('train', ['--data', '{ws}/data.zip', '--outdir', '{ws}/out', '--lr', 'nan'], '--lr'),
    ('train', ['--data', '{ws}/data.zip', '--outdir', '{ws}/out', '--duration', 'inf'], '--duration'),
    ('train', ['--data', '{ws}/data.zip', '--outdir', '{ws}/out', '--batch', '10', '--batch-gpu', '4'], '--batch-gpu'),
    ('train', ['--data', '{ws}/unlabelled.zip', '--outdir', '{ws}/out', '--cond'], '--cond'),
    ('train', ['--data', '{ws}/data.zip', '--outdir', '{ws}/out', '--cres', 'a,b'], '--cres'),
    ('train', ['--data', '{ws}/data.zip', '--outdir', '{ws}/out', '--attn', '7'], '--attn'),
    ('train', ['--resume', '{ws}/missing'], '--resume'),
    ('train', ['--resume', '{ws}/norun'], 'training-state'),

    # dataset_tool.py
    ('dataset_tool', ['--source', '{ws}/missingdir', '--dest', '{ws}/d.zip'], 'missingdir'),
    ('dataset_tool', ['--source', 'mnist:{ws}/missing.pkl.gz', '--dest', '{ws}/d.zip'], 'missing.pkl.gz'),
    ('dataset_tool', ['--source', 'mnist:{ws}/mnist-garbage.pkl.gz', '--dest', '{ws}/d.zip'], 'mnist-garbage'),
    ('dataset_tool', ['--source', 'mnist:{ws}/mnist-wrong.pkl.gz', '--dest', '{ws}/d.zip'], 'mnist-wrong'),
    ('dataset_tool', ['--source', '{ws}/images', '--dest', '{ws}/fulldest'], 'fulldest'),
    ('dataset_tool', ['--source', '{ws}/images', '--dest', '{ws}/afile'], 'afile'),
    ('dataset_tool', ['--source', '{ws}/images', '--dest', '{ws}/afile/d.zip'], 'afile'),
    ('dataset_tool', ['--source', '{ws}/images', '--dest', '{ws}/d.zip', '--resolution', '30'], '--resolution'),
    ('dataset_tool', ['--source', '{ws}/nonsquare', '--dest', '{ws}/d.zip'], 'square'),
    ('dataset_tool', ['--source', '{ws}/brokenimages', '--dest', '{ws}/d.zip'], 'b.png'),
    ('dataset_tool', ['--source', '{ws}/mixedimages', '--dest', '{ws}/d.zip'], 'b.png'),
    ('dataset_tool', ['--source', '{ws}/badjson', '--dest', '{ws}/d.zip'], 'dataset.json'),
    ('dataset_tool', ['--source', 'nosuchsource', '--dest', '{ws}/d.zip'], 'nosuchsource'),
    ('dataset_tool', ['--source', '{ws}/images', '--dest', '{ws}/d.zip', '--max-images', '0'], '--max-images'),
]

def check_one_line_error(result, word):
    """The common assertions of a failed command: exit code, one line, the word, no traceback."""
    text = result.output
    assert result.exit_code not in (0, None), text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in text and 'internal error' not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('Error: ')]
    assert len(errors) == 1 and lines[-1] == errors[0], text
    assert word in errors[0], text

@pytest.mark.parametrize('cli,args,word', CASES, ids=[f'{c[0]}-{i}' for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_error(ws, cli, args, word):
    before = _fingerprint(ws)
    out_before = sorted(os.listdir(ws / 'out')) if (ws / 'out').exists() else []
    argv = [a.replace('{ws}', str(ws)) for a in args]
    result = CliRunner().invoke(CLIS[cli], argv)
    check_one_line_error(result, word)
    after = _fingerprint(ws)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, changed
    out_after = sorted(os.listdir(ws / 'out')) if (ws / 'out').exists() else []
    assert out_after == out_before, 'a run folder was left behind'
    assert not [p for p in after if '.tmp-' in p]

def test_battery_covers_every_cli():
    counts = {name: sum(1 for c in CASES if c[0] == name) for name in CLIS}
    assert len(CASES) >= 80 and min(counts.values()) >= 10, counts

#----------------------------------------------------------------------------
# Full disks: a small tmpfs (needs root and mount; skipped elsewhere).

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / 'disk'
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which('mount') is None:
        pytest.skip('needs root to mount a tmpfs')
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', str(mount)], capture_output=True).returncode:
        pytest.skip('cannot mount a tmpfs here')
    try:
        (mount / 'earlier.txt').write_text('written before the disk filled\n')
        yield mount
    finally:
        subprocess.run(['umount', str(mount)], check=False)

def _fill(mount, leave):
    """Fill the disk, leaving about `leave` bytes free."""
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    with open(mount / 'filler', 'wb') as f:
        f.write(b'\0' * max(free - leave, 0))

def test_full_disk_refine(ws, small_disk):
    _fill(small_disk, 16 * 1024)
    result = CliRunner().invoke(refine_cli.main, ['--teacher', str(ws / 'teacher.pkl'), '--outdir', str(small_disk / 'runs'),
        '--batch', '4', '--kimg', '0.008', '--tick', '0.004', '--snap', '1'])
    check_one_line_error(result, 'no space left')
    assert (small_disk / 'earlier.txt').read_text() == 'written before the disk filled\n'
    leftovers = [f for _, _, files in os.walk(small_disk) for f in files if '.tmp-' in f]
    assert not leftovers

def test_full_disk_generate(ws, small_disk):
    _fill(small_disk, 4 * 1024)
    result = CliRunner().invoke(generate.main, ['--network', str(ws / 'teacher.pkl'), '--outdir', str(small_disk / 'gen'),
        '--seeds', '0-63', '--steps', '2', '--grid', str(small_disk / 'grid.png')])
    check_one_line_error(result, 'no space left')
    assert (small_disk / 'earlier.txt').read_text() == 'written before the disk filled\n'

def test_full_disk_train(ws, small_disk):
    _fill(small_disk, 24 * 1024)
    result = CliRunner().invoke(train_cli.main, ['--data', str(ws / 'data.zip'), '--outdir', str(small_disk / 'runs'),
        '--cbase', '8', '--cres', '1', '--blocks', '1', '--attn', '', '--batch', '4', '--duration', '0.000008',
        '--tick', '0.004', '--workers', '0'])
    check_one_line_error(result, 'no space left')
    assert (small_disk / 'earlier.txt').read_text() == 'written before the disk filled\n'
