"""Noise-level distributions and loss weightings shared by the divergences.

Every distribution is written for EDM's image scale (sigma_data = 0.5) and multiplied by
`scale` = teacher.sigma_data / 0.5, so the published settings carry over unchanged to images
and stretch sensibly to data on another scale (a 2-D mixture spread over [-40, 40], say).
"""

import torch

class LogNormalSigma:
    """ln(sigma) ~ N(P_mean, P_std^2): EDM's training distribution (Diff-Instruct's too)."""
    def __init__(self, P_mean=-1.2, P_std=1.2, scale=1.0):
        self.P_mean, self.P_std, self.scale = P_mean, P_std, scale

    def sample(self, rnd):
        return (rnd.randn() * self.P_std + self.P_mean).exp() * self.scale

class KarrasUniformSigma:
    """sigma^(1/rho) uniform between the Karras grid's ends over u in [u_min, u_max].

    u = 0 is sigma_max and u = 1 is sigma_min. SiD draws u in [1 - tmax/1000, 1]; DMD2 draws a
    grid index, which is the same up to discreteness.

    With `fine_fraction` f > 0 the draws are a mixture: with probability f from the fine end
    u in [fine_u_min, u_max] only, else from the whole range. It is one uniform draw per sample
    either way (split at f), so it changes the noise levels, not the random stream.
    """
    def __init__(self, sigma_min=0.002, sigma_max=80.0, rho=7.0, u_min=0.0, u_max=1.0, scale=1.0,
            fine_u_min=None, fine_fraction=0.0):
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.u_min, self.u_max, self.scale = u_min, u_max, scale
        self.fine_u_min, self.fine_fraction = fine_u_min, float(fine_fraction)
        if self.fine_fraction and not (0 < self.fine_fraction < 1 and u_min <= fine_u_min < u_max):
            raise ValueError(f'fine_fraction must be in (0, 1) and fine_u_min in [u_min, u_max), '
                f'got {fine_fraction} and {fine_u_min}')

    def sample(self, rnd):
        v = rnd.rand()
        if self.fine_fraction:
            f = self.fine_fraction
            u = torch.where(v < f, self.fine_u_min + (v / f) * (self.u_max - self.fine_u_min),
                self.u_min + ((v - f) / (1 - f)) * (self.u_max - self.u_min))
        else:
            u = self.u_min + v * (self.u_max - self.u_min)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (hi + u * (lo - hi)) ** self.rho * self.scale

def edm_weight(sigma, sigma_data):
    """EDM's DSM weight lambda(sigma) = 1/sigma^2 + 1/sigma_data^2 (unit loss at init)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2

def expand_like(sigma, x):
    """[N] noise levels reshaped to broadcast against x of shape [N, ...]."""
    return sigma.reshape([-1] + [1] * (x.ndim - 1))

def make_sigma_distribution(name, scale=1.0, **kwargs):
    table = dict(lognormal=LogNormalSigma, karras=KarrasUniformSigma)
    if name not in table:
        raise ValueError(f"unknown sigma distribution '{name}' (choose from {', '.join(table)})")
    return table[name](scale=scale, **kwargs)

