"""Post-hoc EMA (Karras et al. 2024, section 3): choose a network's EMA length after training.

A power-function EMA with exponent gamma, read at training time t (in images), averages past
parameters theta(tau) with the density
    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t,
whose standard deviation relative to t is
    sigma_rel(gamma) = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))          (exp_to_std)
(gamma = 0, the box average, is the largest: sigma_rel < sqrt(1/12) ~ 0.2887). Its inverse is
the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (std_to_exp).

Training tracks a few such EMAs (`PowerFunctionEMA`, EDM2's defaults sigma_rel 0.050 and 0.100):
after each step, at t images seen (batch of d), theta_ema <- beta theta_ema + (1 - beta) theta
with beta = (1 - d/t)^(gamma + 1). Snapshots of them at several times t_i span a space of
averaging profiles. Any other profile q (another sigma_rel, at one of the snapshot times) is
approximated by its least-squares projection onto that span in L2(tau):
    A_ii' = <p_i, p_i'>,  B_ij = <p_i, q_j>,  A X = B (float64),  columns of X normalised to 1,
    theta_j = sum_i X_ij theta_i,
with the closed form (over tau in [0, min(t_a, t_b)])
    <p_a, p_b> = (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) max(t_a, t_b)) * r,
    r = (t_a/t_b)^g_b if t_a < t_b, else (t_b/t_a)^g_a.

`reconstruct` applies this to EDM2 snapshot pickles `network-snapshot-{kimg:07d}-{std:.3f}.pkl`
(NVlabs' training loop writes one per tracked profile) and writes EDM2-layout pickles
`{prefix}-{kimg:07d}-{std:.3f}.pkl` (`ema` in float16, the other entries of the first input),
which work as `--teacher` here (and in NVlabs' EDM2 tools). Snapshot times come from the file
names: nimg = floor((kimg*1000 + 999)/1024) * 1024 (EDM2 snapshots at multiples of 1024 images).

CLI:
  python -m training.phema --indir SNAPSHOTS --outdir OUT --std 0.05,0.1,0.15 [--kimg KIMG]
Then e.g.  python refine.py --teacher OUT/phema-0002147-0.130.pkl ...
Loading runs nothing from the files (torch_utils.safe_pickle) unless --allow-pickle-code.
"""

import copy
import os
import re

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------
# Profiles.

def exp_to_std(exp):
    """sigma_rel of the power-function profile with exponent gamma (numbers or arrays)."""
    exp = np.float64(exp)
    return np.sqrt((exp + 1) / (exp + 2) ** 2 / (exp + 3))

def std_to_exp(std):
    """gamma for sigma_rel: the largest real root of the cubic in the module docstring."""
    std = np.float64(std)
    if not 0 < std < np.sqrt(1 / 12):
        raise ValueError(f'sigma_rel must be in (0, {np.sqrt(1 / 12):.4f}), got {std:g}')
    s2 = std ** -2
    roots = np.roots([1, 7, 16 - s2, 12 - s2])
    return float(np.max(roots[np.abs(roots.imag) < 1e-9 * np.maximum(1, np.abs(roots))].real))

def profile_inner(t_a, exp_a, t_b, exp_b):
    """<p_a, p_b> over tau (closed form, module docstring); broadcasts over numpy arrays."""
    t_a, exp_a, t_b, exp_b = (np.float64(v) for v in (t_a, exp_a, t_b, exp_b))
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, exp_b, -exp_a)
    t_max = np.maximum(t_a, t_b)
    return (exp_a + 1) * (exp_b + 1) / (exp_a + exp_b + 1) * t_ratio ** t_exp / t_max

def solve_weights(in_times, in_stds, out_times, out_stds):
    """X [m, k]: target j = sum_i X_ij input i (least squares in L2(tau), columns sum to 1)."""
    in_times, out_times = np.float64(in_times), np.float64(out_times)
    in_exps = np.array([std_to_exp(s) for s in np.ravel(in_stds)])
    out_exps = np.array([std_to_exp(s) for s in np.ravel(out_stds)])
    out_times = np.broadcast_to(out_times, out_exps.shape)
    A = profile_inner(in_times[:, None], in_exps[:, None], in_times[None, :], in_exps[None, :])
    B = profile_inner(in_times[:, None], in_exps[:, None], out_times[None, :], out_exps[None, :])
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0, keepdims=True)

#----------------------------------------------------------------------------
# Tracking during training.

class PowerFunctionEMA:
    """EMAs of `net` with power-function profiles, one per sigma_rel (EDM2's interface)."""

    def __init__(self, net, stds=(0.050, 0.100)):
        self.net = net
        self.stds = [float(s) for s in stds]
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds]

    @torch.no_grad()
    def reset(self):
        for ema in self.emas:
            for p_ema, p in zip(ema.parameters(), self.net.parameters()):
                p_ema.copy_(p)

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        """After a step: `cur_nimg` images seen in all, the last `batch_size` of them in it."""
        for std, ema in zip(self.stds, self.emas):
            beta = (1 - batch_size / cur_nimg) ** (std_to_exp(std) + 1)
            for p_ema, p in zip(ema.parameters(), self.net.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, beta))

    @torch.no_grad()
    def get(self):
        """[(ema_net, '-{std:.3f}')]; buffers are the training net's, not averaged."""
        for ema in self.emas:
            for b_ema, b in zip(ema.buffers(), self.net.buffers()):
                b_ema.copy_(b)
        return [(ema, f'-{std:.3f}') for std, ema in zip(self.stds, self.emas)]

    def state_dict(self):
        return dict(stds=self.stds, emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state):
        self.stds = [float(s) for s in state['stds']]
        for ema, sd in zip(self.emas, state['emas']):
            ema.load_state_dict(sd)

#----------------------------------------------------------------------------
# Reconstruction from snapshot pickles.

_NAME = re.compile(r'^(?P<prefix>.*)-(?P<kimg>\d+)-(?P<std>\d+\.\d+)\.pkl$')

def kimg_to_nimg(kimg):
    """A snapshot's image count from the kimg in its name (snapshots at multiples of 1024)."""
    nimg = (int(kimg) * 1000 + 999) // 1024 * 1024
    if nimg // 1000 != int(kimg):
        raise ValueError(f'{kimg} kimg is not a multiple-of-1024 image count')
    return nimg

def list_snapshots(paths):
    """[(path, nimg, std)] of `*-{kimg}-{std}.pkl` files (directories are listed), by time."""
    found = []
    for path in [paths] if isinstance(paths, str) else paths:
        names = sorted(os.listdir(path)) if os.path.isdir(path) else [os.path.basename(path)]
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        for name in names:
            m = _NAME.match(name)
            if m:
                found.append((os.path.join(folder, name), kimg_to_nimg(m['kimg']), float(m['std'])))
    return sorted(found, key=lambda item: (item[1], item[2]))

def _load(path, allow_code):
    from torch_utils import safe_pickle # pylint: disable=import-outside-toplevel
    data = safe_pickle.load_network_pkl(path, allow_code=allow_code)
    safe_pickle.require_module(data, 'ema', path)
    return data

def reconstruct(inputs, out_stds, outdir, out_kimg=None, prefix='phema', batch=8, allow_code=False, log=print):
    """Write `{prefix}-{kimg:07d}-{std:.3f}.pkl` to `outdir` for each sigma_rel in `out_stds`,
    reconstructed at `out_kimg` (default: the latest input) from the snapshot pickles `inputs`
    (files or directories). Returns the written paths."""
    snapshots = list_snapshots(inputs)
    if not snapshots:
        raise ValueError(f'no snapshot pickles named *-KIMG-STD.pkl in {inputs}')
    out_nimg = max(t for _, t, _ in snapshots) if out_kimg is None else kimg_to_nimg(out_kimg)
    if out_nimg not in {t for _, t, _ in snapshots}:
        raise ValueError(f'{out_nimg // 1000} kimg is not the time of any input snapshot')
    snapshots = [s for s in snapshots if 0 < s[1] <= out_nimg]
    out_stds = [float(s) for s in out_stds]
    for std in out_stds:
        std_to_exp(std) # range check before any work
    os.makedirs(outdir, exist_ok=True)
    written = []
    for first in range(0, len(out_stds), batch):
        stds = out_stds[first:first + batch]
        X = solve_weights([t for _, t, _ in snapshots], [s for _, _, s in snapshots], out_nimg, stds)
        template, nets = None, None
        for i, (path, nimg, std) in enumerate(snapshots):
            log(f'{path} ({nimg} images, sigma_rel {std:.3f})')
            data = _load(path, allow_code)
            ema = data['ema'].to(torch.float32)
            if template is None:
                template = data
                nets = [copy.deepcopy(ema) for _ in stds]
                for net in nets:
                    for p in net.parameters():
                        p.data.zero_()
            with torch.no_grad():
                for j, net in enumerate(nets):
                    for p_out, p_in in zip(net.parameters(), ema.parameters()):
                        p_out.add_(p_in * float(X[i, j]))
                    for b_out, b_in in zip(net.buffers(), ema.buffers()):
                        b_out.copy_(b_in) # buffers: the last input's
        for std, net in zip(stds, nets):
            out = copy.copy(template)
            out = dnnlib.EasyDict(out) if isinstance(template, dnnlib.EasyDict) else dict(out)
            out['ema'] = net.eval().requires_grad_(False).to(torch.float16)
            path = os.path.join(outdir, f'{prefix}-{out_nimg // 1000:07d}-{std:.3f}.pkl')
            from torch_utils import persistence # pylint: disable=import-outside-toplevel
            persistence.save_network_pkl(out, path)
            log(f'wrote {path}')
            written.append(path)
    return written

#----------------------------------------------------------------------------

def main(argv=None):
    import click # pylint: disable=import-outside-toplevel

    @click.command()
    @click.option('--indir', 'inputs', help='Snapshot pickles or folders (*-KIMG-STD.pkl)', metavar='PATH', multiple=True, required=True)
    @click.option('--outdir', help='Where to write the reconstructions', metavar='DIR', required=True)
    @click.option('--std', 'stds', help='Target sigma_rel values, e.g. 0.05,0.1', metavar='LIST', required=True)
    @click.option('--kimg', 'out_kimg', help='Time of the reconstruction [default: latest input]', type=int, default=None)
    @click.option('--prefix', help='Output file name prefix', default='phema', show_default=True)
    @click.option('--batch', help='Targets per pass over the inputs', type=click.IntRange(min=1), default=8, show_default=True)
    @click.option('--allow-pickle-code', help='Run code embedded in the pickles (trusted files only)', is_flag=True)
    def cli(inputs, outdir, stds, out_kimg, prefix, batch, allow_pickle_code):
        """Post-hoc EMA reconstruction of EDM2 snapshots (see training/phema.py)."""
        try:
            targets = [float(s) for s in stds.split(',') if s.strip()]
            reconstruct(list(inputs), targets, outdir, out_kimg=out_kimg, prefix=prefix, batch=batch,
                allow_code=allow_pickle_code, log=lambda msg: click.echo(msg, err=True))
        except (ValueError, OSError) as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return cli.main(args=argv, standalone_mode=argv is None)

if __name__ == '__main__':
    main()
