"""Hostile files through every CLI and every public loading function with its defaults: no
payload runs (no marker file appears), and the refusal is one line.

Payloads: a `__reduce__` that calls os.system, NVlabs-style embedded module source with a side
effect at import, a hostile training_options.json / options.json, and a hostile MNIST pickle.
"""

import gzip
import io
import json
import os
import pickle
import shutil

import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import fid
import generate
from metrics import stats
from refine import generation, teachers
from torch_utils import persistence, safe_pickle
from training import networks_edm
from tests.scripts import load_script
from tests.test_bad_inputs import check_one_line_error

refine_cli = load_script('refine.py', 'refine_cli_malicious')
train_cli = load_script('train.py', 'train_cli_malicious')

class ReducePayload:
    """Unpickling this runs a shell command that creates the marker file."""
    def __init__(self, marker):
        self.marker = marker
    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))

class EmbeddedSourcePayload:
    """An NVlabs persistent object whose embedded module source creates the marker on import."""
    def __init__(self, marker):
        self.marker = marker
    def __reduce__(self):
        src = f'import pathlib\npathlib.Path({str(self.marker)!r}).touch()\n\nclass Evil:\n    pass\n'
        meta = dict(type='class', version=6, module_src=src, class_name='Evil', state=dict(x=1))
        return (persistence._reconstruct_persistent_obj, (meta,)) # pylint: disable=protected-access

def _dump(obj, path):
    with open(path, 'wb') as f:
        pickle.dump(obj, f)
    return str(path)

@pytest.fixture
def files(tmp_path):
    marker = tmp_path / 'PWNED'
    out = dict(marker=marker, root=tmp_path)
    out['reduce'] = _dump(dict(ema=ReducePayload(marker)), tmp_path / 'reduce.pkl')
    out['source'] = _dump(dict(ema=EmbeddedSourcePayload(marker)), tmp_path / 'source.pkl')
    out['nested'] = _dump(dict(G_ema=dict(inner=[ReducePayload(marker)])), tmp_path / 'nested.pkl')
    with gzip.open(tmp_path / 'mnist.pkl.gz', 'wb') as f:
        pickle.dump(((ReducePayload(marker), None), (None, None), (None, None)), f)
    out['mnist'] = str(tmp_path / 'mnist.pkl.gz')
    with open(tmp_path / 'ref.npz', 'wb') as f: # an .npz whose arrays are pickled objects
        import numpy as np # pylint: disable=import-outside-toplevel
        np.savez(f, mu=np.array([ReducePayload(marker)], dtype=object), sigma=np.zeros([1, 1]))
    out['npz'] = str(tmp_path / 'ref.npz')
    return out

PICKLES = ['reduce', 'source', 'nested']

def _no_payload(files):
    assert not files['marker'].exists(), 'the payload ran'

#----------------------------------------------------------------------------
# Every CLI that reads a network pickle.

@pytest.mark.parametrize('kind', PICKLES)
@pytest.mark.parametrize('cli', ['refine-teacher', 'refine-gen', 'generate', 'fid-calc'])
def test_clis_refuse_pickle_payloads(files, kind, cli, tmp_path):
    path = files[kind]
    if cli == 'refine-teacher':
        result = CliRunner().invoke(refine_cli.main, ['--teacher', path, '--outdir', str(tmp_path / 'runs')])
    elif cli == 'refine-gen':
        result = CliRunner().invoke(refine_cli.main, ['--teacher', 'gmm:ring8', '--gen', path, '--outdir', str(tmp_path / 'runs')])
    elif cli == 'generate':
        result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'gen')])
    else:
        result = CliRunner().invoke(fid.main, ['calc', '--network', path, '--ref', files['npz'], '--detector', 'fast'])
    check_one_line_error(result, os.path.basename(path) if kind != 'source' else 'Evil')
    _no_payload(files)
    assert not (tmp_path / 'runs').exists()

def test_dataset_tool_refuses_a_hostile_mnist_file(files, tmp_path):
    result = CliRunner().invoke(dataset_tool.main, ['--source', f"mnist:{files['mnist']}", '--dest', str(tmp_path / 'd.zip')])
    check_one_line_error(result, 'mnist.pkl.gz')
    _no_payload(files)
    assert not (tmp_path / 'd.zip').exists()

def test_fid_refuses_an_npz_of_pickled_objects(files, tmp_path):
    os.makedirs(tmp_path / 'imgs')
    import PIL.Image # pylint: disable=import-outside-toplevel
    import numpy as np # pylint: disable=import-outside-toplevel
    for i in range(3):
        PIL.Image.fromarray(np.zeros([8, 8], np.uint8)).save(tmp_path / 'imgs' / f'{i}.png')
    result = CliRunner().invoke(fid.main, ['calc', '--images', str(tmp_path / 'imgs'), '--ref', files['npz'], '--detector', 'fast'])
    check_one_line_error(result, 'ref.npz')
    _no_payload(files)

#----------------------------------------------------------------------------
# Hostile options files in run folders.

def _tiny_teacher(path):
    torch.manual_seed(0)
    net = networks_edm.EDMPrecond(img_resolution=8, img_channels=1, label_dim=0, model_type='SongUNet',
        model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    persistence.save_network_pkl(dict(ema=net.eval().requires_grad_(False)), path)
    return str(path)

def test_train_resume_refuses_foreign_classes(files, tmp_path):
    run = tmp_path / 'trainrun'
    run.mkdir()
    torch.save(dict(net={}, cur_nimg=0, cur_tick=0), run / 'training-state-000000.pt')
    options = dict(dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='x'),
        network_kwargs=dict(class_name='training.networks_edm.EDMPrecond'),
        loss_kwargs=dict(class_name='subprocess.Popen', args=[f"touch {files['marker']}"], shell=True))
    (run / 'training_options.json').write_text(json.dumps(options))
    result = CliRunner().invoke(train_cli.main, ['--resume', str(run)])
    check_one_line_error(result, 'subprocess.Popen')
    _no_payload(files)
    for key in ('dataset_kwargs', 'network_kwargs'): # any nested class name is checked, too
        hostile = json.loads(json.dumps(options))
        hostile['loss_kwargs'] = dict(class_name='training.loss.EDMLoss')
        hostile[key] = dict(hostile[key], class_name='os.system')
        (run / 'training_options.json').write_text(json.dumps(hostile))
        check_one_line_error(CliRunner().invoke(train_cli.main, ['--resume', str(run)]), 'os.system')

def test_refine_resume_never_trusts_its_options_file(files, tmp_path):
    teacher = _tiny_teacher(tmp_path / 'teacher.pkl')
    result = CliRunner().invoke(refine_cli.main, ['--teacher', teacher, '--outdir', str(tmp_path / 'runs'),
        '--batch', '2', '--kimg', '0.004', '--tick', '0.002'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / 'runs' / os.listdir(tmp_path / 'runs')[0]
    options = json.loads((run / 'options.json').read_text())
    # The saved file asks for code execution and names a pickle with embedded source: the
    # command line did not allow it, so nothing runs.
    options.update(allow_pickle_code=True, teacher=files['source'], kimg=0.008)
    (run / 'options.json').write_text(json.dumps(options))
    check_one_line_error(CliRunner().invoke(refine_cli.main, ['--resume', str(run)]), 'Evil')
    _no_payload(files)
    options.update(teacher=teacher, div_opt=dict(gen_sigma='__import__("os").system("x")'))
    (run / 'options.json').write_text(json.dumps(options))
    check_one_line_error(CliRunner().invoke(refine_cli.main, ['--resume', str(run)]), 'unknown sigma distribution')

#----------------------------------------------------------------------------
# Public loading functions with their defaults.

@pytest.mark.parametrize('kind', PICKLES)
@pytest.mark.parametrize('loader', ['persistence.load', 'safe_pickle.load', 'load_network_pkl',
    'load_teacher', 'load_for_generation'])
def test_public_loaders_refuse_payloads(files, kind, loader):
    path = files[kind]
    with pytest.raises((pickle.UnpicklingError, ValueError)) as info:
        if loader in ('persistence.load', 'safe_pickle.load'):
            with open(path, 'rb') as f:
                data = (persistence.load if loader == 'persistence.load' else safe_pickle.load)(f)
            safe_pickle.require_module(data, 'ema' if kind != 'nested' else 'G_ema')
        elif loader == 'load_network_pkl':
            data = safe_pickle.load_network_pkl(path)
            safe_pickle.require_module(data, 'ema' if kind != 'nested' else 'G_ema')
        elif loader == 'load_teacher':
            teachers.load_teacher(path)
        else:
            generation.load_for_generation(path)
    assert len(str(info.value).splitlines()) == 1
    _no_payload(files)

def test_plain_data_loaders_refuse_payloads(files):
    with pytest.raises(ValueError):
        dataset_tool.load_mnist_arrays(files['mnist'], 'train')
    with pytest.raises(ValueError):
        stats.load_stats(files['npz'])
    with open(files['reduce'], 'rb') as f:
        with pytest.raises(pickle.UnpicklingError):
            safe_pickle.load_plain_data(f)
    buffer = io.BytesIO()
    torch.save(dict(x=ReducePayload(files['marker'])), buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True) # how every training state is read
    _no_payload(files)

def test_allow_code_warns_with_the_names_of_the_code_it_runs(files, capsys):
    shutil.copy(files['source'], files['root'] / 'trusted.pkl')
    data = safe_pickle.load_network_pkl(str(files['root'] / 'trusted.pkl'), allow_code=True)
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith('Warning:')]
    assert len(warning) == 1 and 'trusted.pkl' in warning[0] and 'Evil' in warning[0]
    assert files['marker'].exists() and type(data['ema']).__name__ == 'Evil' # allowed: it ran
    files['marker'].unlink()
    with open(files['reduce'], 'rb') as f:
        assert 'posix.system' in ' '.join(safe_pickle.code_in_pickle(f)) or 'os.system' in ' '.join(safe_pickle.code_in_pickle(f))
    _no_payload(files) # scanning ran nothing
