"""Image writing shared by every floor: float [-1, 1] to uint8 the EDM way, PNGs written
atomically, grids and side-by-side grids."""

import math

import numpy as np
import PIL.Image
import torch

import dnnlib

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

def write_png(array_hwc, path):
    """Write a PNG under a temporary name first, so a crash never leaves half an image."""
    # uint8 HxW becomes mode 'L', uint8 HxWx3 mode 'RGB'.
    array = array_hwc[:, :, 0] if array_hwc.shape[2] == 1 else array_hwc
    image = PIL.Image.fromarray(np.ascontiguousarray(array))
    with dnnlib.util.atomic_path(path) as tmp_path:
        image.save(tmp_path, format='PNG')

def save_image(image, path):
    """Save one image (CHW, uint8 or float in [-1, 1]) as a grayscale or RGB PNG."""
    array = _as_uint8_nchw(image)[0].permute(1, 2, 0).numpy()
    write_png(array, path)

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
    write_png(grid_array(images, grid_w), path)

def save_side_by_side(image_sets, path, grid_w=None, gap=8):
    """Several grids of the same layout next to each other, separated by grey gaps (one PNG)."""
    grids = [grid_array(images, grid_w) for images in image_sets]
    height = max(g.shape[0] for g in grids)
    parts = []
    for i, grid in enumerate(grids):
        if i:
            parts.append(np.full([height, gap, grid.shape[2]], 128, dtype=np.uint8))
        parts.append(np.pad(grid, [(0, height - grid.shape[0]), (0, 0), (0, 0)]))
    write_png(np.concatenate(parts, axis=1), path)
