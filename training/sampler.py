"""The EDM deterministic/stochastic Heun sampler (Karras et al. 2022, Algorithm 2).

`edm_sampler` takes the options and makes the random draws in the order of EDM's generate.py,
so that the same pickle and seeds give the same images. Used by the teacher-training loop's
sample grids and by refine.generation.
"""

import math

import torch

def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80, rho=7, round_sigma=None,
        device=None):
    """The N noise levels t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho,
    each passed through `round_sigma`, followed by t_N = 0. Float64, shape [N+1]."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / max(num_steps - 1, 1) # N=1 gives just sigma_max instead of 0/0
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if round_sigma is not None:
        t = round_sigma(t)
    return torch.cat([torch.as_tensor(t), torch.zeros_like(t[:1])])

def edm_sampler(net, latents, class_labels=None, num_steps=18, sigma_min=0.002, sigma_max=80,
        rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, randn_like=torch.randn_like):
    """Sample by integrating the probability-flow ODE (plus optional churn) from sigma_max to 0.

    `net(x, sigma, class_labels)` is an EDM denoiser; `latents` are unit Gaussian noise.
    Uses 2*num_steps - 1 network evaluations and returns float64 samples.
    """
    # The schedule must stay inside what the network supports.
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, net.round_sigma, latents.device)
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: raise the noise level to t_hat by adding fresh noise.
        gamma = gamma_max if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur
        if S_churn > 0: # draw on every step once churn is on, as EDM does, to keep its noise stream
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_next.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun (2nd-order) correction, except into sigma = 0 where d is undefined.
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
