"""The files shipped in pretrained/: the MNIST teacher loads safely, fits in git, and draws the
digit it is asked for; the teacher's reference metrics and the MNIST statistics are readable."""

import json
import os

import numpy as np
import torch

from metrics import detectors, stats
from refine import generation
from torch_utils.images import to_uint8
from torch_utils import safe_pickle
from training import networks_edm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, 'pretrained', 'edm-mnist32-cond.pkl')

def test_teacher_is_a_small_safe_loading_conditional_edm_network():
    assert os.path.getsize(TEACHER) <= 15 * 2**20
    data = safe_pickle.load_network_pkl(TEACHER)
    net = data['ema']
    assert isinstance(net, networks_edm.EDMPrecond)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (32, 1, 10)
    assert data['dataset_kwargs']['path'].endswith('mnist-32x32.zip')

def test_teacher_draws_the_requested_digits():
    """35-NFE Heun samples, five per class, classified by the shipped fast detector (an
    untrained network scores ~10%; the shipped teacher about 80%)."""
    torch.manual_seed(0)
    sample, meta = generation.load_for_generation(TEACHER)
    assert meta.nfe == 35
    images = torch.cat([sample(list(range(100 + 5 * k, 105 + 5 * k)), k) for k in range(10)])
    probs = detectors.load_detector('fast').probabilities(to_uint8(images))
    predicted = probs.argmax(axis=1)
    wanted = np.repeat(np.arange(10), 5)
    assert (predicted == wanted).mean() >= 0.7, predicted

def test_reference_files():
    mu, sigma = stats.load_stats(os.path.join(ROOT, 'pretrained', 'mnist-train60k-fast.npz'))
    assert mu.shape == (128,) and sigma.shape == (128, 128)
    with open(os.path.join(ROOT, 'pretrained', 'edm-mnist32-cond-reference.json')) as f:
        reference = json.load(f)
    assert reference['num_samples'] >= 5000 and reference['metrics']['fd5000'] > 0

STUDENT = os.path.join(ROOT, 'pretrained', 'sid-mnist32-cond.pkl')

def test_student_is_a_safe_loading_one_step_generator_of_the_teacher():
    assert os.path.getsize(STUDENT) <= 5 * 2**20
    data = safe_pickle.load_network_pkl(STUDENT)
    assert set(data) >= {'G_ema', 'ema', 'sigma_init', 'kimg'} and 'fake' not in data and 'G' not in data
    assert data['divergence']['name'] == 'sid' and data['teacher'].endswith('edm-mnist32-cond.pkl')
    # The SiD / Diff-Instruct convention: 'ema' at sigma_init is the generator itself.
    z = torch.randn([4, 1, 32, 32], generator=torch.Generator().manual_seed(0))
    c = torch.eye(10)[[0, 3, 5, 9]]
    with torch.no_grad():
        direct = data['ema'](z * data['sigma_init'], torch.full([4], data['sigma_init']), c)
        assert torch.allclose(data['G_ema'](z, c), direct, rtol=1e-5, atol=1e-5)

def test_student_draws_the_requested_digits():
    """One-step samples, five per class, classified by the shipped fast detector."""
    sample, meta = generation.load_for_generation(STUDENT)
    assert meta.nfe == 1
    with torch.no_grad():
        images = torch.cat([sample(list(range(100 + 5 * k, 105 + 5 * k)), k) for k in range(10)])
    predicted = detectors.load_detector('fast').probabilities(to_uint8(images)).argmax(axis=1)
    assert (predicted == np.repeat(np.arange(10), 5)).mean() >= 0.7, predicted

def test_student_reference_is_below_the_teachers_fd():
    refs = {}
    for name in ('edm-mnist32-cond', 'sid-mnist32-cond'):
        with open(os.path.join(ROOT, 'pretrained', f'{name}-reference.json')) as f:
            refs[name] = json.load(f)
    assert refs['sid-mnist32-cond']['num_samples'] == refs['edm-mnist32-cond']['num_samples'] == 5000
    assert refs['sid-mnist32-cond']['metrics']['fd5000'] < refs['edm-mnist32-cond']['metrics']['fd5000']
