"""The EDM deterministic/stochastic Heun sampler, per-seed random draws, and image writing.

`edm_sampler` follows Karras et al. 2022 (Algorithm 2) with the options and the order of
random draws of EDM's generate.py, so that the same pickle and seeds give the same images.
"""

import math
import os
import uuid

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

#----------------------------------------------------------------------------
# Noise levels and the sampler.

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

#----------------------------------------------------------------------------
# Per-seed random draws.

class StackedRandomGenerator:
    """One torch.Generator per sample, seeded with that sample's seed.

    Every draw is made per sample and stacked, so what a seed gets does not depend on which
    other seeds share its batch (nor on the batch size or the number of processes).
    """

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32))
            for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators), 'the first dimension must be the number of seeds'
        kwargs['device'] = self.device # the generators' device; EDM-style callers pass it too
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators), 'the first dimension must be the number of seeds'
        kwargs['device'] = self.device
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs)
            for gen in self.generators])

#----------------------------------------------------------------------------
# Images.

def to_uint8(x):
    """Float images in [-1, 1] to uint8, the EDM way: (x*127.5+128).clip(0,255)."""
    return (torch.as_tensor(x) * 127.5 + 128).clip(0, 255).to(torch.uint8)

def _as_uint8_nchw(images):
    images = torch.as_tensor(images).detach().cpu()
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'expected images shaped [N, 1 or 3, H, W], got {list(images.shape)}')
    return images

def _save_png_atomically(array_hwc, path):
    """Write a PNG under a temporary name first, so a crash never leaves half an image."""
    # uint8 HxW becomes mode 'L', uint8 HxWx3 mode 'RGB'.
    array = array_hwc[:, :, 0] if array_hwc.shape[2] == 1 else array_hwc
    image = PIL.Image.fromarray(np.ascontiguousarray(array))
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')
    try:
        image.save(tmp_path, format='PNG')
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)

def save_image(image, path):
    """Save one image (CHW, uint8 or float in [-1, 1]) as a grayscale or RGB PNG."""
    array = _as_uint8_nchw(image)[0].permute(1, 2, 0).numpy()
    _save_png_atomically(array, path)

def grid_array(images, grid_w=None):
    """Images (NCHW, uint8 or float in [-1, 1]) tiled row by row, grid_w per row: uint8 HWC."""
    images = _as_uint8_nchw(images)
    n, c, h, w = images.shape
    grid_w = grid_w or max(int(math.ceil(math.sqrt(n))), 1)
    grid_h = max(int(math.ceil(n / grid_w)), 1)
    canvas = torch.zeros([grid_h * grid_w, c, h, w], dtype=torch.uint8)
    canvas[:n] = images
    canvas = canvas.reshape(grid_h, grid_w, c, h, w).permute(0, 3, 1, 4, 2) # gh, h, gw, w, c
    return canvas.reshape(grid_h * h, grid_w * w, c).numpy()

def save_image_grid(images, path, grid_w=None):
    """Save images (NCHW, uint8 or float in [-1, 1]) as one PNG, row by row, grid_w per row."""
    _save_png_atomically(grid_array(images, grid_w), path)

def save_side_by_side(image_sets, path, grid_w=None, gap=8):
    """Several grids of the same layout next to each other, separated by grey gaps (one PNG)."""
    grids = [grid_array(images, grid_w) for images in image_sets]
    height = max(g.shape[0] for g in grids)
    parts = []
    for i, grid in enumerate(grids):
        if i:
            parts.append(np.full([height, gap, grid.shape[2]], 128, dtype=np.uint8))
        parts.append(np.pad(grid, [(0, height - grid.shape[0]), (0, 0), (0, 0)]))
    _save_png_atomically(np.concatenate(parts, axis=1), path)

def _nice_ticks(lo, hi, target=5):
    """Round tick values (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
    raw = (hi - lo) / max(target - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw / 1.5)
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]
    decimals = max(0, -int(math.floor(math.log10(step) + 1e-9)))
    return [(t, f'{0.0 if abs(t) < step * 1e-6 else t:.{decimals}f}') for t in ticks]

def _component_ellipses(components, n_std=2.0, points=96):
    """Outlines [K, points, 2] of the n_std ellipses of a mixture's components in its first two
    coordinates (marginal means and covariances): `components` is a GMMTeacher or (means, covs)."""
    if hasattr(components, 'means'):
        means, covs = components.means, components.covs
    else:
        means, covs = components
    means = np.asarray(torch.as_tensor(means).detach().cpu().to(torch.float64)).reshape(len(means), -1)
    covs = np.asarray(torch.as_tensor(covs).detach().cpu().to(torch.float64)).reshape(len(means), means.shape[1], -1)
    d = min(means.shape[1], 2)
    mu, cov = np.zeros([len(means), 2]), np.zeros([len(means), 2, 2])
    mu[:, :d], cov[:, :d, :d] = means[:, :d], covs[:, :d, :d]
    angle = np.linspace(0, 2 * np.pi, points)
    circle = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    outlines = []
    for m, c in zip(mu, cov):
        lam, vec = np.linalg.eigh(c)
        outlines.append(m + n_std * (circle * np.sqrt(np.clip(lam, 0, None))) @ vec.T)
    return np.stack(outlines)

def save_scatter_png(points, path, size=512, margin=48, num_ticks=5, components=None, title=None):
    """Scatter plot of points [N, >=1] (first two coordinates) as a size x size PNG.

    Both axes share one scale (a circle stays a circle), chosen to fit every finite point and
    the components' ellipses. `components` (a GMMTeacher, or (means [K, d], covs [K, d, d]))
    draws each mixture component's 2-std ellipse (marginal of the first two coordinates) in
    orange under the samples; ticks sit at round values; `title` is written at the top.
    Drawn with PIL alone, to spare a plotting dependency.
    """
    pts = np.asarray(torch.as_tensor(points).detach().cpu().to(torch.float64))
    pts = pts.reshape(len(pts), -1)
    xy = np.zeros([len(pts), 2])
    xy[:, :min(pts.shape[1], 2)] = pts[:, :2]
    xy = xy[np.isfinite(xy).all(axis=1)]
    outlines = _component_ellipses(components) if components is not None else np.zeros([0, 1, 2])
    extent = np.concatenate([xy, outlines.reshape(-1, 2)])

    # One square data window around the points and ellipses, 5% padding, never of zero size.
    if len(extent):
        center = (extent.min(0) + extent.max(0)) / 2
        half = float((extent.max(0) - extent.min(0)).max()) / 2 * 1.05
    else:
        center, half = np.zeros(2), 1.0
    half = half if half > 0 else 1.0
    lo, span = center - half, 2 * half
    inner = size - 2 * margin

    def to_px(v, axis): # data -> pixel; the y axis points up
        p = (v - lo[axis]) / span * (inner - 1)
        return margin + p if axis == 0 else size - 1 - margin - p

    image = PIL.Image.new('RGB', (size, size), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(image)
    for outline in outlines: # under the samples
        draw.line([(float(to_px(u, 0)), float(to_px(v, 1))) for u, v in outline], fill=(255, 127, 14), width=2)
    canvas = np.array(image)
    px = np.round(to_px(xy[:, 0], 0)).astype(np.int64)
    py = np.round(to_px(xy[:, 1], 1)).astype(np.int64)
    for dx in (0, 1): # 2x2 dots
        for dy in (0, 1):
            canvas[np.clip(py + dy, 0, size - 1), np.clip(px + dx, 0, size - 1)] = (31, 119, 180)

    image = PIL.Image.fromarray(canvas)
    draw = PIL.ImageDraw.Draw(image)
    draw.rectangle([margin - 2, margin - 2, size - margin + 1, size - margin + 1], outline=(0, 0, 0))
    for axis in (0, 1):
        for value, label in _nice_ticks(lo[axis], lo[axis] + span, num_ticks):
            p = to_px(value, axis)
            if axis == 0:
                draw.line([p, size - margin + 1, p, size - margin + 6], fill=(0, 0, 0))
                draw.text((p - 3 * len(label), size - margin + 8), label, fill=(0, 0, 0))
            else:
                draw.line([margin - 7, p, margin - 2, p], fill=(0, 0, 0))
                draw.text((max(2, margin - 9 - 6 * len(label)), p - 5), label, fill=(0, 0, 0))
    if title:
        draw.text((margin, 8), title, fill=(0, 0, 0))
    _save_png_atomically(np.asarray(image), path)

CURVE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
    (140, 86, 75), (227, 119, 194), (127, 127, 127)]

def save_curve_png(series, path, hlines=None, title='', xlabel='', ylabel='', log_y=False,
        width=640, height=400, margin=56, num_ticks=5):
    """Line plot: `series` {label: (xs, ys)} as lines with dots, `hlines` {label: y} as dashed
    horizontal lines (e.g. a teacher's metric to beat); a legend at the top right. PIL only."""
    hlines = hlines or {}
    xs_all = np.concatenate([np.asarray(x, dtype=np.float64) for x, _ in series.values()] or [np.zeros(1)])
    ys_all = np.concatenate([np.asarray(y, dtype=np.float64) for _, y in series.values()] + [np.asarray(list(hlines.values()), dtype=np.float64)])
    ty = np.log10 if log_y else (lambda v: np.asarray(v, dtype=np.float64))
    finite = ys_all[np.isfinite(ys_all) & ((ys_all > 0) if log_y else True)]
    y_lo, y_hi = (float(ty(finite).min()), float(ty(finite).max())) if len(finite) else (0.0, 1.0)
    x_lo, x_hi = float(np.nanmin(xs_all)), float(np.nanmax(xs_all))
    pad = 0.05 * ((y_hi - y_lo) or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = x_hi if x_hi > x_lo else x_lo + 1.0

    def px(x):
        return margin + (x - x_lo) / (x_hi - x_lo) * (width - 2 * margin)

    def py(y):
        return height - margin - (ty(y) - y_lo) / (y_hi - y_lo) * (height - 2 * margin)

    image = PIL.Image.new('RGB', (width, height), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(image)
    draw.rectangle([margin, margin, width - margin, height - margin], outline=(0, 0, 0))
    for k in range(num_ticks):
        xv = x_lo + (x_hi - x_lo) * k / (num_ticks - 1)
        yt = y_lo + (y_hi - y_lo) * k / (num_ticks - 1)
        yv = 10 ** yt if log_y else yt
        x, y = px(xv), py(yv)
        draw.line([x, height - margin, x, height - margin + 5], fill=(0, 0, 0))
        draw.text((x - 12, height - margin + 8), f'{xv:.3g}', fill=(0, 0, 0))
        draw.line([margin - 5, y, margin, y], fill=(0, 0, 0))
        draw.text((4, y - 5), f'{yv:.3g}', fill=(0, 0, 0))
    draw.text((width / 2 - 4 * len(xlabel) / 2, height - margin + 24), xlabel, fill=(0, 0, 0))
    draw.text((4, margin - 20), ylabel, fill=(0, 0, 0))
    draw.text((width / 2 - 3 * len(title), 8), title, fill=(0, 0, 0))
    legend = []
    for i, (label, y) in enumerate(hlines.items()):
        colour = CURVE_COLOURS[(len(series) + i) % len(CURVE_COLOURS)]
        for x0 in range(margin, width - margin, 12):
            draw.line([x0, py(y), min(x0 + 6, width - margin), py(y)], fill=colour, width=2)
        legend.append((label, colour))
    for i, (label, (xs, ys)) in enumerate(series.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        points = [(px(x), py(y)) for x, y in zip(xs, ys) if np.isfinite(y) and (y > 0 or not log_y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        legend.insert(i, (label, colour))
    for i, (label, colour) in enumerate(legend):
        y = margin + 8 + 14 * i
        draw.line([width - margin - 150, y + 5, width - margin - 130, y + 5], fill=colour, width=2)
        draw.text((width - margin - 124, y), label, fill=(0, 0, 0))
    _save_png_atomically(np.asarray(image), path)
