"""bench/train_stylegan2_mnist.py's losses: the discriminator loss against its formula, with each
image judged under its own label."""

import torch
import torch.nn.functional as F

from tests.scripts import load_script

def _load_bench():
    return load_script('bench/train_stylegan2_mnist.py', 'train_stylegan2_mnist')

class LabelProjection(torch.nn.Module):
    """D(x, c) = <mean pixel of x, 1> * (c . v) + (x^2 summed) * a: depends on the label and has a
    simple input gradient, 2 a x, for checking R1."""
    def __init__(self):
        super().__init__()
        self.v = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        self.a = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, c):
        return (x.mean(dim=[1, 2, 3]) * (c @ self.v) + self.a * x.square().sum(dim=[1, 2, 3]))[:, None]

def test_d_loss_judges_each_image_with_its_own_label_and_adds_lazy_r1():
    bench = _load_bench()
    D = LabelProjection()
    torch.manual_seed(0)
    reals, fakes = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    c_real, c_fake = torch.eye(3)[[0, 1, 2, 0]], torch.eye(3)[[2, 2, 1, 0]]
    gamma, interval = 0.3, 4
    expected = F.softplus(D(fakes, c_fake)).mean() + F.softplus(-D(reals, c_real)).mean()
    got = bench.d_logistic_r1(D, reals, c_real, fakes, c_fake, gamma, False, interval)
    assert torch.allclose(got, expected)
    # The same fakes under the reals' labels give a different loss: the labels matter.
    assert not torch.allclose(bench.d_logistic_r1(D, reals, c_real, fakes, c_real, gamma, False, interval), expected)
    # R1: grad_x D(x, c) = mean-pixel term + 2 a x, squared, summed per image, averaged.
    grad = (c_real @ D.v)[:, None, None, None] / 4 + 2 * D.a * reals
    r1 = grad.square().sum(dim=[1, 2, 3]).mean() * gamma / 2 * interval
    got = bench.d_logistic_r1(D, reals, c_real, fakes, c_fake, gamma, True, interval)
    assert torch.allclose(got, expected + r1)
