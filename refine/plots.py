"""Plots written as PNGs without a plotting library: scatter plots of vector samples (with the
teacher's mixture components drawn under them) and curves with reference lines."""

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from torch_utils.images import write_png

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
    write_png(np.asarray(image), path)

CURVE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
    (140, 86, 75), (227, 119, 194), (127, 127, 127)]

def _font(size=12):
    """DejaVu Sans where the system has it (PIL's built-in font sets spaces 2 px wide)."""
    try:
        return PIL.ImageFont.truetype('DejaVuSans.ttf', size)
    except OSError:
        return PIL.ImageFont.load_default(size=size)

def _log_ticks(lo, hi):
    """1, 2, 5 x 10^k inside [10^lo, 10^hi] (log10 bounds), as (log10 value, label)."""
    def ticks_of(mantissas):
        found = []
        for k in range(math.floor(lo) - 1, math.ceil(hi) + 1):
            for m in mantissas:
                v = m * 10.0 ** k
                if lo - 1e-9 <= math.log10(v) <= hi + 1e-9:
                    found.append((math.log10(v), f'{v:g}'))
        return found
    ticks = ticks_of((1, 2, 5))
    if len(ticks) < 3: # a narrow range: more mantissas
        ticks = ticks_of((1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9))
    if len(ticks) > 8: # a wide range: the powers of ten only
        ticks = ticks_of((1,))
    return ticks

def save_curve_png(series, path, hlines=None, title='', xlabel='', ylabel='', log_y=False, log_x=False,
        width=720, height=440, margin=64):
    """Line plot: `series` {label: (xs, ys)} as lines with dots, `hlines` {label: y} as dashed
    horizontal lines (e.g. a teacher's metric to beat); a legend at the top right; round tick
    values on linear or log axes. PIL only."""
    hlines = hlines or {}
    def axis(values, log):
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values) & ((values > 0) if log else True)]
        t = np.log10(values) if log else values
        lo, hi = (float(t.min()), float(t.max())) if len(t) else (0.0, 1.0)
        pad = 0.05 * ((hi - lo) or 1.0)
        return lo - pad, hi + pad
    xs_all = np.concatenate([np.asarray(x, dtype=np.float64) for x, _ in series.values()] or [np.zeros(1)])
    ys_all = np.concatenate([np.asarray(y, dtype=np.float64) for _, y in series.values()] + [np.asarray(list(hlines.values()), dtype=np.float64)])
    x_lo, x_hi = axis(xs_all, log_x)
    y_lo, y_hi = axis(ys_all, log_y)
    tx = (lambda v: math.log10(v)) if log_x else float
    ty = (lambda v: math.log10(v)) if log_y else float

    def px(x):
        return margin + (tx(x) - x_lo) / (x_hi - x_lo) * (width - 2 * margin)

    def py(y):
        return height - margin - (ty(y) - y_lo) / (y_hi - y_lo) * (height - 2 * margin)

    def visible(x, y):
        return np.isfinite(x) and np.isfinite(y) and (x > 0 or not log_x) and (y > 0 or not log_y)

    font, small = _font(13), _font(11)
    image = PIL.Image.new('RGB', (width, height), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(image)
    draw.rectangle([margin, margin, width - margin, height - margin], outline=(0, 0, 0))
    x_ticks = _log_ticks(x_lo, x_hi) if log_x else _nice_ticks(x_lo, x_hi)
    y_ticks = _log_ticks(y_lo, y_hi) if log_y else _nice_ticks(y_lo, y_hi)
    for t, label in x_ticks:
        x = margin + (t - x_lo) / (x_hi - x_lo) * (width - 2 * margin)
        draw.line([x, height - margin, x, height - margin + 5], fill=(0, 0, 0))
        draw.text((x - small.getlength(label) / 2, height - margin + 8), label, fill=(0, 0, 0), font=small)
    for t, label in y_ticks:
        y = height - margin - (t - y_lo) / (y_hi - y_lo) * (height - 2 * margin)
        draw.line([margin - 5, y, margin, y], fill=(0, 0, 0))
        draw.text((margin - 8 - small.getlength(label), y - 7), label, fill=(0, 0, 0), font=small)
    draw.text((width / 2 - font.getlength(xlabel) / 2, height - margin + 26), xlabel, fill=(0, 0, 0), font=font)
    draw.text((8, margin - 24), ylabel, fill=(0, 0, 0), font=font)
    draw.text((max(4, width / 2 - font.getlength(title) / 2), 14), title, fill=(0, 0, 0), font=font)
    legend = []
    for i, (label, y) in enumerate(hlines.items()):
        colour = CURVE_COLOURS[(len(series) + i) % len(CURVE_COLOURS)]
        for x0 in range(margin, width - margin, 12):
            draw.line([x0, py(y), min(x0 + 6, width - margin), py(y)], fill=colour, width=2)
        legend.append((label, colour))
    for i, (label, (xs, ys)) in enumerate(series.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        points = [(px(x), py(y)) for x, y in zip(xs, ys) if visible(x, y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend.insert(i, (label, colour))
    legend_w = max([small.getlength(label) for label, _ in legend] or [0]) + 36
    for i, (label, colour) in enumerate(legend):
        y = margin + 8 + 16 * i
        x0 = width - margin - legend_w
        draw.line([x0, y + 7, x0 + 20, y + 7], fill=colour, width=2)
        draw.text((x0 + 26, y), label, fill=(0, 0, 0), font=small)
    write_png(np.asarray(image), path)
