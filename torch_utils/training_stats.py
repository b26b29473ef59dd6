"""A small statistics collector: report values anywhere, reduce them across ranks periodically.

    training_stats.report('Loss/G', loss)          # a scalar or a tensor of per-sample values
    ...
    training_stats.default_collector.update()      # every rank calls it (it is a collective)
    stats = training_stats.default_collector.as_dict()   # {'Loss/G': {'num', 'mean', 'std'}}
    training_stats.append_jsonl('stats.jsonl', dict(kimg=..., **stats))

Each name accumulates (count, sum, sum of squares) in float64 so that update() can combine any
number of reports from any number of processes with one all_reduce. `std` is the population
standard deviation of all values reported in the interval.
"""

import json
import math
import os
import re
import threading
import time

import numpy as np
import torch

from torch_utils import distributed

_lock = threading.Lock()
_pending = dict() # name -> float64 tensor [count, sum, sum of squares], on the reporting device

def report(name, value):
    """Add `value` (a number, or a tensor/array of values) to the statistics called `name`.

    Returns `value` unchanged, so that `loss = report('Loss/G', loss)` reads naturally.
    """
    values = torch.as_tensor(value).detach().flatten().to(torch.float64)
    if values.numel() == 0:
        return value
    moments = torch.stack([torch.ones_like(values).sum(), values.sum(), values.square().sum()])
    with _lock:
        if name in _pending:
            _pending[name] = _pending[name] + moments.to(_pending[name].device)
        else:
            _pending[name] = moments
    return value

def report0(name, value):
    """report() on rank 0 only: for values that every rank computes identically."""
    if distributed.is_main():
        report(name, value)
    return value

def _moments_to_stats(moments):
    num, total, squares = (float(v) for v in moments)
    mean = total / num
    var = max(squares / num - mean ** 2, 0.0) # cancellation can make it slightly negative
    return dict(num=int(round(num)), mean=mean, std=math.sqrt(var))

class Collector:
    """Collects the statistics whose names match `regex` each time update() is called."""

    def __init__(self, regex='.*'):
        self._regex = re.compile(regex)
        self._results = dict()

    def _take_pending(self):
        with _lock:
            names = [name for name in _pending if self._regex.fullmatch(name)]
            return {name: _pending.pop(name) for name in names}

    def update(self):
        """Reduce what was reported since the last update over all ranks; keep the result.

        With a process group, every rank must call it: the set of names is agreed first
        (ranks may have reported different ones), then the moments are summed in one go.
        """
        taken = self._take_pending()
        names = sorted(taken)
        if distributed.get_world_size() > 1:
            names = sorted(set().union(*distributed.all_gather_object(names)))
        moments = torch.zeros([len(names), 3], dtype=torch.float64)
        for i, name in enumerate(names):
            if name in taken:
                moments[i] = taken[name].cpu()
        distributed.all_reduce_sum(moments)
        self._results = {name: _moments_to_stats(m) for name, m in zip(names, moments) if m[0] > 0}
        return self

    def as_dict(self):
        """{name: {'num', 'mean', 'std'}} as of the last update()."""
        return {name: dict(stats) for name, stats in self._results.items()}

    def names(self):
        return list(self._results)

    def num(self, name):
        return self._results.get(name, dict(num=0))['num']

    def mean(self, name):
        return self._results.get(name, dict(mean=float('nan')))['mean']

    def std(self, name):
        return self._results.get(name, dict(std=float('nan')))['std']

    def reset(self):
        """Forget the last results and drop any pending reports that match this collector."""
        self._take_pending()
        self._results = dict()

default_collector = Collector()

def reset():
    """Drop every pending report (e.g. after a warm-up phase that should not be counted)."""
    with _lock:
        _pending.clear()

#----------------------------------------------------------------------------

def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f'{type(obj).__name__} is not JSON serialisable')

# Our flat tick-record fields and the NVlabs `training_stats` names their log readers know.
_NVLABS_NAMES = dict(tick='Progress/tick', kimg='Progress/kimg', time='Timing/total_sec',
    sec_per_kimg='Timing/sec_per_kimg', maxrss_gb='Resources/cpu_mem_gb', peak_gpu_gb='Resources/peak_gpu_mem_gb')

def with_nvlabs_keys(record):
    """`record` plus the same figures as NVlabs' stats.jsonl lines hold them: each
    `{'num', 'mean', 'std'}` under a `Group/name` key, reported losses as `Loss/...`, and
    `timestamp`, so that EDM/StyleGAN log readers understand our runs too."""
    out = dict(record)
    for key, name in _NVLABS_NAMES.items():
        if isinstance(record.get(key), (int, float)):
            out[name] = dict(num=1, mean=float(record[key]), std=0.0)
    for key, value in record.items():
        if isinstance(value, dict) and 'mean' in value and '/' not in key:
            out[('Loss/' + key[len('loss_'):]) if key.startswith('loss_') else f'Stats/{key}'] = value
    out['timestamp'] = time.time()
    return out

def append_jsonl(path, record):
    """Append `record` as one JSON line, written whole and synced before returning.

    A single write of a complete line to a file opened for appending keeps lines intact even
    if the process dies right after, so readers never see half a record.
    """
    line = json.dumps(record, default=_jsonable) + '\n'
    with open(path, 'a', encoding='utf-8') as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
