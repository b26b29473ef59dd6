"""Random draws that depend only on a seed: per-sample generators (StackedRandomGenerator,
for generation and metrics) and per-phase draws by position in the image stream (StreamRandom,
for the training loops).

Every draw of one phase of one iteration is made for the whole global batch from a generator
seeded by (seed, images seen so far, phase), and each process keeps its own slice. A run
resumed from its training state, or split over any number of processes, therefore sees exactly
the noise of a single uninterrupted process.
"""

import hashlib

import torch

def derive_seed(*parts):
    """A 63-bit seed from any printable parts, stable across Python processes."""
    digest = hashlib.sha256('/'.join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], 'little') & ((1 << 63) - 1)

class StreamRandom:
    """Draws for one phase: shaped [part_batch, *per_sample_shape] on `device`.

    The global batch is cut into `parts` equal contiguous parts (processes x accumulation
    rounds); this object returns part `part` of every draw.
    """

    def __init__(self, seed, position, phase, global_batch, part=0, parts=1, device='cpu'):
        if global_batch % parts != 0:
            raise ValueError(f'batch {global_batch} does not split into {parts} equal parts')
        self.generator = torch.Generator().manual_seed(derive_seed(seed, position, phase))
        self.global_batch = global_batch
        size = global_batch // parts
        self.lo, self.hi = part * size, (part + 1) * size
        self.device = torch.device(device)

    @property
    def part_batch(self):
        return self.hi - self.lo

    def _local(self, full):
        return full[self.lo:self.hi].to(self.device)

    def randn(self, *shape):
        return self._local(torch.randn([self.global_batch, *shape], generator=self.generator))

    def rand(self, *shape):
        return self._local(torch.rand([self.global_batch, *shape], generator=self.generator))

    def randint(self, high, *shape):
        return self._local(torch.randint(high, [self.global_batch, *shape], generator=self.generator))

    def labels(self, label_dim):
        """Uniformly random one-hot class labels, or None for an unconditional model."""
        if not label_dim:
            return None
        return torch.nn.functional.one_hot(self.randint(label_dim), label_dim).to(torch.float32)

#----------------------------------------------------------------------------

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
