"""`grid_sample` as used by the augmentation pipeline.

Current PyTorch supports double backward through `F.grid_sample`, so no custom op is
needed; `enabled` is kept because callers set it.
"""

import torch.nn.functional as F

enabled = False  # Accepted for API compatibility; has no effect.


def grid_sample(input, grid):
    """Bilinear sampling with zero padding and align_corners=False."""
    return F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
