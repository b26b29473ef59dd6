"""CPU vs CUDA parity of the networks, forward and backward, in fp32 (TF32 off) and fp16.

Every network is built once with fixed weights, run on the CPU and on the GPU with the same
inputs (StyleGAN noise 'const'), and compared by relative error ||gpu - cpu|| / ||cpu|| of the
output and of all gradients together (the input's and every parameter's, concatenated: the
direction an optimiser step takes). fp32 rows must have both below --tol; fp16 rows (StyleGAN's
num_fp16_res with conv_clamp) are printed for information. The worst single gradient tensor is
printed too: a scalar such as noise_strength sums many cancelling terms, so its own relative
error reflects summation order (about 1e-2 on an H100) rather than a wrong kernel.
The compiled ops run on CUDA when they build (DI_CUSTOM_OPS=ref: the reference path; the
header line says which): the first rows compare each op's CUDA plugin, output and input
gradient, with the float64 CPU reference at StyleGAN shapes, fp32 and fp16.
Exits with status 1 if an fp32 row fails.

  python bench/cuda_parity.py                      # needs a CUDA device
  python bench/cuda_parity.py --teacher pretrained/edm-mnist32-cond.pkl
  DI_CUSTOM_OPS=ref python bench/cuda_parity.py    # the networks on the reference ops
"""

import copy
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from refine import teachers # pylint: disable=wrong-import-position
from torch_utils.ops import bias_act, filtered_lrelu, upfirdn2d # pylint: disable=wrong-import-position
from training import networks_edm, networks_stylegan2 as sg2 # pylint: disable=wrong-import-position

def rel_err(a, b):
    return ((a.double() - b.double().cpu()).norm() / a.double().norm().clamp_min(1e-30)).item()

def compare(name, net, make_inputs, call, device):
    """Relative errors of the output, of all gradients together, and of the worst gradient tensor."""
    results = []
    for dev in (torch.device('cpu'), device):
        torch.manual_seed(0)
        inputs = [x.to(dev).requires_grad_(x.is_floating_point()) if x is not None else None for x in make_inputs()]
        module = copy.deepcopy(net).to(dev).requires_grad_(True)
        out = call(module, *inputs)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev)
        (out.float() * weight).sum().backward()
        grads = {'input': inputs[0].grad}
        grads.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
        results.append((out.detach().float(), grads))
    (out_cpu, g_cpu), (out_gpu, g_gpu) = results
    everything = rel_err(torch.cat([g.flatten() for g in g_cpu.values()]),
        torch.cat([g.flatten().cpu() for g in g_gpu.values()]))
    per_tensor = {k: rel_err(g_cpu[k], g_gpu[k]) for k in g_cpu if g_cpu[k].norm() > 0}
    worst = max(per_tensor, key=per_tensor.get)
    return name, rel_err(out_cpu, out_gpu), everything, worst, per_tensor[worst]

def op_cases():
    """(name, fn(x, device), x): each op at a StyleGAN shape, run on `device` and on the CPU."""
    g = torch.Generator().manual_seed(0)
    f4 = upfirdn2d.setup_filter([1, 3, 3, 1])
    fk = upfirdn2d.setup_filter(torch.kaiser_window(12, periodic=False, beta=4))
    b = torch.randn(64, generator=g)
    x16, x32 = torch.randn(8, 64, 16, 16, generator=g), torch.randn(8, 64, 32, 32, generator=g)
    yield 'bias_act lrelu clamp', lambda x, d: bias_act.bias_act(x, b.to(d, x.dtype), act='lrelu', clamp=256), x32
    yield 'bias_act swish', lambda x, d: bias_act.bias_act(x, b.to(d, x.dtype), act='swish'), x32
    yield 'upsample2d 4x4', lambda x, d: upfirdn2d.upsample2d(x, f4.to(d)), x16
    yield 'downsample2d 4x4', lambda x, d: upfirdn2d.downsample2d(x, f4.to(d)), x32
    yield 'filter2d 4x4 pad', lambda x, d: upfirdn2d.filter2d(x, f4.to(d), padding=1), x32
    yield 'filtered_lrelu up2 down2 12-tap', lambda x, d: filtered_lrelu.filtered_lrelu(
        x, fk.to(d), fk.to(d), b.to(d, x.dtype), up=2, down=2, padding=[10, 10, 10, 10], clamp=256), x16 * 4

def compare_op(fn, x, device, dtype):
    """Relative errors of the output and the input gradient vs the float64 CPU reference."""
    results = []
    for dev, dt in ((torch.device('cpu'), torch.float64), (device, dtype)):
        xi = x.to(dev, dt).requires_grad_(True)
        out = fn(xi, dev)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev, dt)
        (out * weight).sum().backward()
        results.append((out.detach(), xi.grad))
    (o_ref, g_ref), (o, g) = results
    return rel_err(o_ref, o), rel_err(g_ref, g)

def plugin_status(device):
    if device.type != 'cuda':
        return 'reference ops (CPU plugins where built)'
    found = [m for m, entry in ((bias_act, 'bias_act_cuda'), (upfirdn2d, 'upfirdn2d_cuda'),
        (filtered_lrelu, 'filtered_lrelu_cuda')) if hasattr(m._plugin() or object(), entry)] # pylint: disable=protected-access
    return f'CUDA plugins: {len(found)}/3 ' + ' '.join(m.__name__.split('.')[-1] for m in found)

def stylegan_cases(fp16):
    common = dict(z_dim=64, w_dim=64, c_dim=10, img_resolution=32, img_channels=1)
    extra = dict(num_fp16_res=2, conv_clamp=256) if fp16 else {}
    for arch in ('orig', 'skip', 'resnet'):
        G = sg2.Generator(**common, mapping_kwargs=dict(num_layers=2),
            synthesis_kwargs=dict(channel_base=2048, channel_max=64, architecture=arch, **extra)).eval()
        yield (f'StyleGAN2 G {arch}' + (' fp16' if fp16 else ''), G,
            lambda: [torch.randn(8, 64), torch.eye(10)[torch.arange(8)]],
            lambda m, z, c: m(z, c, noise_mode='const', force_fp32=z.device.type == 'cpu'))
        D = sg2.Discriminator(c_dim=10, img_resolution=32, img_channels=1, architecture=arch,
            channel_base=2048, channel_max=64, **({'num_fp16_res': 2, 'conv_clamp': 256} if fp16 else {})).eval()
        yield (f'StyleGAN2 D {arch}' + (' fp16' if fp16 else ''), D,
            lambda: [torch.randn(8, 1, 32, 32), torch.eye(10)[torch.arange(8)]],
            lambda m, x, c: m(x, c, force_fp32=x.device.type == 'cpu'))

def edm_cases(teacher_path):
    if teacher_path:
        net = teachers.load_teacher(teacher_path).net
        name = os.path.basename(teacher_path)
    else:
        net = networks_edm.EDMPrecond(img_resolution=32, img_channels=1, label_dim=10, model_type='SongUNet',
            model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[16])
        name = 'EDMPrecond DDPM++ (tiny)'
    net = net.eval()
    yield (name, net,
        lambda: [torch.randn(8, 1, 32, 32), torch.tensor([0.002, 0.05, 0.3, 1, 2.5, 10, 40, 80]).reshape(8, 1, 1, 1),
            torch.eye(10)[torch.arange(8)]],
        lambda m, x, sigma, c: m(x * sigma, sigma.detach().flatten(), c))

@click.command()
@click.option('--teacher', default=None, help='Also an EDM pickle (default: a tiny EDM net built here)')
@click.option('--tol', default=1e-5, show_default=True, help='fp32 relative-error bound')
@click.option('--device', default='cuda', show_default=True, help='Device compared with the CPU (cpu: checks this script)')
def main(teacher, tol, device):
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('no CUDA device')
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f'{torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}, torch {torch.__version__}, '
        f'{plugin_status(device)}')
    failed = False
    print(f'{"op":<32s} {"dtype":>8s} {"output":>10s} {"x grad":>10s}')
    for name, fn, x in op_cases():
        for dtype in (torch.float32, torch.float16):
            out_err, grad_err = compare_op(fn, x, device, dtype)
            bad = dtype == torch.float32 and max(out_err, grad_err) > tol
            failed |= bad
            print(f'{name:<32s} {str(dtype)[6:]:>8s} {out_err:10.2e} {grad_err:10.2e}{"  FAIL" if bad else ""}', flush=True)
    print(f'{"network":<32s} {"output":>10s} {"gradients":>10s} {"worst tensor":>12s}  where')
    cases = list(edm_cases(None)) + (list(edm_cases(teacher)) if teacher else []) \
        + list(stylegan_cases(False)) + list(stylegan_cases(True))
    for name, net, make_inputs, call in cases:
        name, out_err, grad_err, worst, worst_err = compare(name, net, make_inputs, call, device)
        bad = 'fp16' not in name and max(out_err, grad_err) > tol
        failed |= bad
        print(f'{name:<32s} {out_err:10.2e} {grad_err:10.2e} {worst_err:12.2e}  {worst}{"  FAIL" if bad else ""}', flush=True)
    print('fp32 parity: ' + ('FAILED' if failed else f'all within {tol:g}'))
    sys.exit(1 if failed else 0)

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
