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
