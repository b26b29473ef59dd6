"""The Divergence seam: everything a method owns, so that the loop owns none of it.

A divergence decides
  * the generator loss (its gradient w.r.t. the generator's output carries the method),
  * the fake-score loss that keeps D_psi the denoiser of the generator's distribution,
  * the noise levels of both, and their weighting and normalisation,
  * whether gradients go through the teacher and fake networks (`grad_through_networks`),
  * how many fake-score updates precede each generator update (`fake_steps`).
Losses are returned per sample; the loop sums them and divides by the global batch size.
A divergence with constraints on the batch defines `check_batch(batch_per_round)`, called
before any work with the images per process and accumulation round (raise ValueError).
"""

import torch

from refine import noise

class Divergence:
    name = None
    grad_through_networks = False

    def __init__(self, sigma_data=0.5, fake_steps=1, fake_sigma='lognormal', fake_sigma_kwargs=None):
        self.sigma_data = float(sigma_data)
        self.fake_steps = int(fake_steps)
        self.fake_sigma = noise.make_sigma_distribution(fake_sigma, scale=self.sigma_data / 0.5,
            **(fake_sigma_kwargs or {}))

    def generator_loss(self, teacher, fake, x_g, labels, rnd):
        """Per-sample generator loss [N] and a dict of per-sample statistics."""
        raise NotImplementedError

    def fake_loss(self, fake, x_g, labels, rnd):
        """EDM denoising score matching of D_psi on (detached) generator samples."""
        sigma = self.fake_sigma.sample(rnd)
        x_t = x_g + noise.expand_like(sigma, x_g) * rnd.randn(*x_g.shape[1:])
        denoised = fake(x_t, sigma, labels)
        weight = noise.expand_like(noise.edm_weight(sigma, self.sigma_data), x_g)
        return (weight * (denoised - x_g).square()).flatten(1).sum(1)

    def options(self):
        """What a snapshot records about this divergence."""
        return dict(name=self.name, fake_steps=self.fake_steps,
            grad_through_networks=self.grad_through_networks)

def surrogate(direction, x_g):
    """Per-sample loss whose gradient w.r.t. x_g is `direction` (held constant)."""
    return (direction.detach() * x_g).flatten(1).sum(1)

def noised_denoisers(teacher, fake, x_g, sigma, labels, rnd):
    """x_t = x_g + σ·n (detached) and both denoisers there, without gradients: the evaluation
    every stop-gradient method (DI, DMD, f-distill) starts from."""
    x_t = (x_g + noise.expand_like(sigma, x_g) * rnd.randn(*x_g.shape[1:])).detach()
    with torch.no_grad():
        return x_t, teacher(x_t, sigma, labels), fake(x_t, sigma, labels)
