"""User-supplied Gaussian mixtures: gmm:FILE.json through load_teacher, resolve_options and a
run, malformed files as one-line errors naming the file, and pickled GMM teachers loading as
the mixture rather than as an EDM network."""

import json

import numpy as np
import pytest
import torch

from refine import run
from refine import teachers as T
from torch_utils import persistence, safe_pickle

F64 = torch.float64

def _write(tmp_path, spec, name='mix.json'):
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return str(path)

def test_json_mixture_forms_match_direct_construction(tmp_path):
    means = [[0.0, 0.0, 1.0], [2.0, -1.0, 0.5]]
    covs = [np.diag([0.1, 0.2, 0.3]).tolist(), [[0.5, 0.1, 0.0], [0.1, 0.4, 0.0], [0.0, 0.0, 0.2]]]
    weights = [3.0, 1.0]
    t = T.load_teacher('gmm:' + _write(tmp_path, dict(means=means, covariances=covs, weights=weights)))
    assert isinstance(t, T.GMMTeacher) and t.shape == (3,) and t.num_components == 2
    torch.testing.assert_close(t.weights, torch.tensor([0.75, 0.25], dtype=F64))
    torch.testing.assert_close(t.covs, torch.tensor(covs, dtype=F64))
    # stds: scalar, [K], [K, d]; 'covs' and 'std' spellings; weights default to uniform.
    for key, std in [('stds', 0.5), ('std', [0.5, 0.5]), ('stds', [[0.5] * 3] * 2)]:
        u = T.load_teacher('gmm:' + _write(tmp_path, {'means': means, key: std}))
        torch.testing.assert_close(u.covs, torch.diag_embed(torch.full([2, 3], 0.25, dtype=F64)))
        torch.testing.assert_close(u.weights, torch.tensor([0.5, 0.5], dtype=F64))
    # One dimension works too, and save_gmm_json round-trips a preset exactly.
    one = T.load_teacher('gmm:' + _write(tmp_path, dict(means=[[-1.0], [1.0]], stds=[0.1, 0.3], weights=[1, 2])))
    assert one.shape == (1,) and one(torch.zeros(4, 1), 0.5).shape == (4, 1)
    ref = T.make_gmm('gauss64')
    path = str(tmp_path / 'g64.json')
    T.save_gmm_json(ref, path)
    back = T.load_teacher(f'gmm:{path}')
    assert torch.equal(back.means, ref.means) and torch.equal(back.covs, ref.covs)
    torch.testing.assert_close(back.weights, ref.weights, rtol=1e-14, atol=0) # renormalised

@pytest.mark.parametrize('spec,message', [
    ('{"means": [[0, 0]], "stds": 1', 'not valid JSON'),
    ('[1, 2]', 'JSON object'),
    (dict(means=[[0, 0], [1, 1]]), 'exactly one of'),
    (dict(means=[[0, 0], [1, 1]], stds=1, covariances=[np.eye(2).tolist()] * 2), 'exactly one of'),
    (dict(means=[0, 1], stds=1), r'\[K, d\]'),
    (dict(means=[[0, 0], [1]], stds=1), 'equal lengths'),
    (dict(means=[[0, 0], [1, 1]], stds=1, weights=[1, 2, 3]), 'K = 2'),
    (dict(means=[[0, 0], [1, 1]], stds=1, weights=[1, -1]), 'positive'),
    (dict(means=[[0, 0], [1, 1]], stds=1, weights=[0, 0]), 'positive'),
    (dict(means=[[0, 0], [1, 1]], stds=[1, 0]), 'stds must be positive'),
    (dict(means=[[0, 0], [1, 1]], covariances=[np.eye(3).tolist()] * 2), r'\[2, 2, 2\]'),
    (dict(means=[[0, 0], [1, 1]], covariances=[np.eye(2).tolist(), [[1, 2], [2, 1]]]), 'covariance 1 is not positive definite'),
    (dict(means=[[0, 0], [1, 1]], covariances=[np.eye(2).tolist(), [[1, 0.5], [0, 1]]]), 'covariance 1 is not symmetric'),
    (dict(means=[[0, 'a']], stds=1), 'numbers'),
    (dict(means=[[0, float('nan')]], stds=1), 'finite'),
    (dict(means=[[0, 0]], stds=1, colour='red'), "unknown key 'colour'"),
])
def test_malformed_json_is_one_line_error_naming_the_file(tmp_path, spec, message):
    path = _write(tmp_path, spec, 'bad-mixture.json')
    with pytest.raises(ValueError, match=message) as info:
        T.load_teacher(f'gmm:{path}')
    text = str(info.value)
    assert 'bad-mixture.json' in text and '\n' not in text

def test_missing_json_and_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match=r'nowhere\.json.*no such file'):
        T.load_teacher(f'gmm:{tmp_path}/nowhere.json')
    with pytest.raises(ValueError, match=r'gmm:FILE\.json.*gmm:ring8'):
        T.load_teacher('gmm:ring9')
    with pytest.raises(ValueError, match=r'only as gmm:'):
        T.load_teacher(_write(tmp_path, dict(means=[[0.0]], stds=1.0)))

def test_resolve_options_takes_json_and_teacher_objects(tmp_path):
    path = _write(tmp_path, dict(means=[[0.0, 0.0], [3.0, 0.0]], stds=0.3))
    base = dict(gen='mlp', outdir=str(tmp_path), allow_pickle_code=False)
    for teacher in [f'gmm:{path}', T.load_teacher(f'gmm:{path}')]:
        o = run.resolve_options(dict(base, teacher=teacher))
        for key, value in run.VECTOR_DEFAULTS.items():
            assert o[key] == value, key
        setup = run.prepare(o)
        assert isinstance(setup.teacher, T.GMMTeacher) and setup.G.out_shape == (2,)
    image = run.resolve_options(dict(base, teacher='edm.pkl'))
    assert image.lr == run.DEFAULTS['lr'] # image defaults untouched

def test_pickled_gmm_teacher_is_the_mixture_not_an_edm_net(tmp_path):
    ref = T.make_gmm('ring8')
    x = torch.randn(5, 2)
    for key in ['ema', 'teacher', 'anything']:
        path = str(tmp_path / f'{key}.pkl')
        persistence.save_network_pkl({key: ref, 'kimg': 1.0}, path)
        for allow_code in (False, True):
            t = T.load_teacher(path, allow_code=allow_code)
            assert type(t) is T.GMMTeacher, (key, allow_code, type(t))
            assert torch.equal(t(x, 0.3), ref(x, 0.3)) and torch.equal(t.weights, ref.weights)
    # Safe loading rebuilds it as our class (no code from the file runs).
    data = safe_pickle.load_network_pkl(str(tmp_path / 'ema.pkl'))
    assert type(data['ema']) is T.GMMTeacher
    # A GMM object is never wrapped as a network, even handed over directly.
    assert not T._is_denoiser(ref)
    with pytest.raises(ValueError, match='not a denoiser network'):
        T.EDMTeacher(torch.nn.Linear(2, 2))
