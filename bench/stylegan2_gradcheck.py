"""Check StyleGAN2 G and D gradients against central finite differences in float64.

The networks compute in float32 by design (their blocks cast to float32/float16), so this
script loads a float64 variant of training/networks_stylegan2.py (its float32 casts replaced
by float64; the ops take any dtype) and compares, for every parameter tensor, the autograd
directional derivative along a random direction with a central difference (step 1e-6).
Printed: the worst relative error per network; every figure should be below 1e-5.

  python bench/stylegan2_gradcheck.py
"""

import importlib.util
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

def load_float64_networks():
    """Import a copy of the network file whose float32 casts read float64 (from a temp dir:
    persistent classes need a module with a source file)."""
    source = open(os.path.join(ROOT, 'training', 'networks_stylegan2.py')).read()
    path = os.path.join(tempfile.mkdtemp(), 'networks_stylegan2_float64.py')
    with open(path, 'w') as f:
        f.write(source.replace('torch.float32', 'torch.float64'))
    spec = importlib.util.spec_from_file_location('networks_stylegan2_float64', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module # persistent_class looks its module up there
    spec.loader.exec_module(module)
    return module

def worst_relative_error(net, loss_fn, eps=1e-6):
    """Max over parameter tensors of |fd - autograd| / |fd| along a random direction."""
    params = list(net.parameters())
    grads = torch.autograd.grad(loss_fn(), params)
    worst, worst_name = 0.0, None
    for (name, p), g in zip(net.named_parameters(), grads):
        v = torch.randn_like(p)
        with torch.no_grad():
            p.add_(eps * v)
            plus = loss_fn()
            p.sub_(2 * eps * v)
            minus = loss_fn()
            p.add_(eps * v)
        fd = float((plus - minus) / (2 * eps))
        err = abs(fd - float((g * v).sum())) / max(abs(fd), 1e-12)
        if err > worst:
            worst, worst_name = err, name
    return worst, worst_name

def main():
    sg2 = load_float64_networks()
    torch.manual_seed(0)
    for arch in ('orig', 'skip', 'resnet'):
        S = sg2.SynthesisNetwork(w_dim=8, img_resolution=16, img_channels=1, channel_base=64,
            channel_max=4, architecture=arch).double().train()
        D = sg2.Discriminator(c_dim=0, img_resolution=16, img_channels=1, channel_base=64,
            channel_max=4, architecture=arch, epilogue_kwargs=dict(mbstd_group_size=2)).double().train()
        for net in (S, D):
            for module in net.modules(): # the FIR filters stay float32, as the ops expect
                if hasattr(module, 'resample_filter'):
                    module.resample_filter = module.resample_filter.float()
            with torch.no_grad(): # away from the initial zeros (biases, noise strengths)
                for p in net.parameters():
                    p.add_(0.3 * torch.randn_like(p))
        ws = torch.randn(4, S.num_ws, 8, dtype=torch.float64)
        img = torch.tanh(torch.linspace(-3, 3, 4 * 256, dtype=torch.float64)).reshape(4, 1, 16, 16)
        checks = [
            (f'G synthesis {arch}, non-fused', S, lambda: S(ws, noise_mode='const', fused_modconv=False).square().sum()),
            (f'G synthesis {arch}, fused', S, lambda: S(ws, noise_mode='const', fused_modconv=True).square().sum()),
            (f'D {arch}', D, lambda: D(img, None).square().sum()),
        ]
        for label, net, loss_fn in checks:
            err, name = worst_relative_error(net, loss_fn)
            print(f'{label:<32s} worst relative error {err:.2e} ({name})')

if __name__ == '__main__':
    main()
