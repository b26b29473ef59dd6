"""Batched feature extraction from a generator or an image dataset, split across processes.

Rank r of W handles batches r, r + W, r + 2W, ... (torch_utils.distributed; a plain process is
rank 0 of 1). The per-batch results are gathered and put back in order, so the output does not
depend on the number of processes. Every rank must call these functions (they gather); every
rank gets the result.

An "extractor" is a function uint8 NCHW -> float64 [N, K] (a detector's `features` or
`probabilities`); one pass over the images feeds all of them.
"""

import os

import numpy as np
import torch

import dnnlib
from torch_utils.images import to_uint8
from torch_utils import distributed

class SourceError(ValueError):
    """A one-line problem with the images to measure."""

def _my_batches(num, batch):
    """[(batch index, row slice)] of this process."""
    everyone = [(i, slice(s, min(s + batch, num))) for i, s in enumerate(range(0, num, batch))]
    return everyone[distributed.get_rank()::distributed.get_world_size()]

def _run(num, batch, load_batch, extractors, progress, what):
    """Run `extractors` ({key: fn}) over batches from `load_batch(slice) -> uint8 NCHW`."""
    local = dict() # batch index -> {key: array}
    mine = _my_batches(num, batch)
    bar = dnnlib.util.Progress(len(mine), f'{what}: batches of this process', progress) if progress else None
    if bar is not None:
        bar.update(0)
    for count, (index, rows) in enumerate(mine):
        images = load_batch(rows)
        local[index] = {key: fn(images) for key, fn in extractors.items()}
        if bar is not None:
            bar.update(count + 1)
    merged = dict()
    for part in distributed.all_gather_object(local):
        merged.update(part)
    return {key: np.concatenate([merged[i][key] for i in sorted(merged)]) for key in extractors}

#----------------------------------------------------------------------------

def sampler_outputs(sample_fn, seeds, num_labels=0, label_seed=0, device='cpu'):
    """A `load_batch` for `_run` that calls `sample_fn(seeds, labels)` and converts to uint8.

    With num_labels > 0, each image gets a uniformly random one-hot label drawn from
    RandomState(label_seed) for the whole seed list at once (so independent of batching and
    ranks); with 0, `labels` is None and the sampler chooses (e.g. refine.generation draws a
    label per seed).
    """
    classes = None
    if num_labels:
        classes = np.random.RandomState(label_seed).randint(num_labels, size=len(seeds))
    eye = torch.eye(num_labels, device=device) if num_labels else None

    def load_batch(rows):
        batch_seeds = [int(s) for s in seeds[rows]] # plain ints, as samplers expect
        labels = eye[torch.as_tensor(classes[rows], device=device)] if num_labels else None
        out = sample_fn(batch_seeds, labels)
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise SourceError('metrics need images [N, C, H, W] from the generator, got '
                f'{type(out).__name__} of shape {list(getattr(out, "shape", []))}')
        return to_uint8(out.detach()).cpu()
    return load_batch

def generated_features(sample_fn, seeds, extractors, batch=64, num_labels=0, label_seed=0,
        device='cpu', progress=None):
    """{key: [len(seeds), K]} for the images `sample_fn` makes from `seeds` (see
    `sampler_outputs`), in seed order."""
    seeds = np.asarray(list(seeds), dtype=np.int64)
    load_batch = sampler_outputs(sample_fn, seeds, num_labels, label_seed, device)
    with torch.no_grad():
        return _run(len(seeds), batch, load_batch, extractors, progress, 'generating')

#----------------------------------------------------------------------------

def open_dataset(path, max_size=None, random_seed=0):
    """training.dataset.ImageFolderDataset of a directory or ZIP, with one-line errors.

    `max_size` keeps a random subset, as EDM's fid.py does (RandomState(seed) shuffle, sort).
    """
    from training.dataset import ImageFolderDataset # pylint: disable=import-outside-toplevel
    if not os.path.exists(path):
        raise SourceError(f'{path}: no such file or directory')
    try:
        return ImageFolderDataset(path, max_size=max_size, random_seed=random_seed, use_labels=False)
    except (OSError, ValueError) as e:
        raise SourceError(str(e) if str(path) in str(e) else f'{path}: {e}') from None

def is_dataset_path(path):
    return isinstance(path, str) and (os.path.isdir(path) or path.lower().endswith('.zip'))

def dataset_features(dataset, extractors, batch=64, progress=None):
    """{key: [len(dataset), K]} for every image of `dataset` (a path or an ImageFolderDataset)."""
    if isinstance(dataset, str):
        dataset = open_dataset(dataset)

    def load_batch(rows):
        images = []
        for i in range(rows.start, rows.stop):
            try:
                item = dataset[i]
            except AssertionError as e: # ImageFolderDataset's check that all images match
                raise SourceError(f'{getattr(dataset, "_path", "dataset")}: {e}') from None
            images.append(item[0] if isinstance(item, tuple) else item)
        return torch.from_numpy(np.stack(images))
    with torch.no_grad():
        return _run(len(dataset), batch, load_batch, extractors, progress, 'reading images')
