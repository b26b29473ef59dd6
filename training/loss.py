"""Denoising score-matching losses of Karras et al. 2022 for the VP, VE and EDM formulations.

Each loss draws a noise level per image, adds Gaussian noise of that level, asks the network
`net(y + n, sigma, labels)` for the clean image and returns the weighted squared error per
pixel (the caller sums and normalises). Class names and constructor arguments follow NVlabs EDM,
so that their snapshots' `loss_fn` entries rebuild as these classes.

This file is embedded in every snapshot that holds a loss: it may import only numpy, torch and
`torch_utils.persistence`, and its attributes hold only Python numbers. Random draws use torch's
global generator; the training loop seeds it per batch to make runs reproducible.
"""

import torch

from torch_utils import persistence

def _augment(images, augment_pipe):
    """The (possibly augmented) clean images and their augmentation labels."""
    if augment_pipe is None:
        return images, None
    return augment_pipe(images)

def _weighted_error(net, images, sigma, weight, labels, augment_pipe):
    y, augment_labels = _augment(images, augment_pipe)
    n = torch.randn_like(y) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)

#----------------------------------------------------------------------------

@persistence.persistent_class
class VPLoss:
    """Variance-preserving loss: t ~ U(epsilon_t, 1), sigma = sigma_vp(t), weight 1/sigma^2."""
    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        return _weighted_error(net, images, sigma, weight, labels, augment_pipe)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

@persistence.persistent_class
class VELoss:
    """Variance-exploding loss: sigma log-uniform in [sigma_min, sigma_max], weight 1/sigma^2."""
    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        return _weighted_error(net, images, sigma, weight, labels, augment_pipe)

@persistence.persistent_class
class EDMLoss:
    """EDM loss: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    which makes the effective target of the network's raw output unit-variance at every level."""
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return _weighted_error(net, images, sigma, weight, labels, augment_pipe)
