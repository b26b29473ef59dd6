"""A plain convolutional GAN discriminator (DCGAN-style) with projection conditioning.

The StyleGAN2 generator of bench/train_stylegan2_mnist.py is trained against this D: at the
32-64 channel widths a CPU can train, StyleGAN2's own discriminator drove every run into
mode collapse within 10-20 kimg, while this one did not (README, "Refining a StyleGAN").

Stride-2 4x4 convolutions with leaky ReLU halve the resolution down to 4x4; the logit is a
linear read-out of the flattened features plus, with labels, the projection term
<embed(c), features> / sqrt(features) (Miyato & Koyama 2018). PyTorch's default initialisation,
no equalized learning rate. Persistent, so snapshots that hold it stay self-contained.
"""

import math

import torch
import torch.nn.functional as F

from torch_utils import persistence

def _uniform(shape, fan_in):
    """PyTorch's default initialisation of conv and linear layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return torch.nn.Parameter((torch.rand(shape) * 2 - 1) / math.sqrt(fan_in))

@persistence.persistent_class
class ConvDiscriminator(torch.nn.Module):
    """Plain tensors only (no torch.nn layer classes), so the safe loader can rebuild it."""
    def __init__(self,
        c_dim,                  # Conditioning label size (0: unconditional).
        img_resolution,         # Input resolution (a power of two, >= 8).
        img_channels,           # Input channels.
        channel_base    = 32,   # Channels of the first convolution; doubled at every halving.
        channel_max     = 256,  # Maximum channels.
    ):
        assert img_resolution >= 8 and img_resolution & (img_resolution - 1) == 0
        super().__init__()
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.num_convs = 0
        channels, res = img_channels, img_resolution
        while res > 4:
            out = min(channel_base * img_resolution // res, channel_max)
            fan_in = channels * 16
            setattr(self, f'conv{self.num_convs}_weight', _uniform([out, channels, 4, 4], fan_in))
            setattr(self, f'conv{self.num_convs}_bias', _uniform([out], fan_in))
            self.num_convs += 1
            channels, res = out, res // 2
        self.num_features = channels * 16
        self.out_weight = _uniform([1, self.num_features], self.num_features)
        self.out_bias = _uniform([1], self.num_features)
        self.embed_weight = _uniform([self.num_features, c_dim], c_dim) if c_dim > 0 else None

    def forward(self, img, c, **_kwargs):
        x = img.to(torch.float32)
        for idx in range(self.num_convs):
            x = F.conv2d(x, getattr(self, f'conv{idx}_weight'), getattr(self, f'conv{idx}_bias'), stride=2, padding=1)
            x = F.leaky_relu(x, 0.2)
        h = x.flatten(1)
        logits = F.linear(h, self.out_weight, self.out_bias)
        if self.embed_weight is not None:
            projection = F.linear(c.to(torch.float32), self.embed_weight)
            logits = logits + (projection * h).sum(dim=1, keepdim=True) / math.sqrt(self.num_features)
        return logits

    def extra_repr(self):
        return f'c_dim={self.c_dim}, img_resolution={self.img_resolution}, img_channels={self.img_channels}'
