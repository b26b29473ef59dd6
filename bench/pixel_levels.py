"""How dark are the backgrounds? Fractions of grey levels in image sets (MNIST digits, uint8).

A "haze" shows up as pixels at 1-20 where the training digits have exact zeros. For each
folder of PNGs or dataset ZIP (dataset_tool.py's format), the first --num images (sorted
names) are read and the fraction of all their pixels in each grey-level bin is printed.

  python bench/pixel_levels.py datasets/mnist-32x32.zip out/samples-edm-mnist32-cond out/samples-sid-mnist32-cond
"""

import io
import os
import sys
import zipfile

import click
import numpy as np
import PIL.Image

BINS = [(0, 0), (1, 5), (6, 20), (21, 80), (81, 200), (201, 255)]

def read_bytes(path):
    with open(path, 'rb') as f:
        return f.read()

def read_images(path, num):
    """uint8 [N, H, W] (first channel) of the first `num` PNGs of a folder or ZIP."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith('.png'))[:num]
        blobs = (read_bytes(os.path.join(path, n)) for n in names)
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if n.lower().endswith('.png'))[:num]
            blobs = [z.read(n) for n in names]
    else:
        raise click.BadParameter(f'{path}: not a folder of PNGs or a ZIP', param_hint='PATHS')
    images = [np.asarray(PIL.Image.open(io.BytesIO(b))) for b in blobs]
    if not images:
        raise click.BadParameter(f'{path}: no PNG images', param_hint='PATHS')
    return np.stack([im if im.ndim == 2 else im[..., 0] for im in images])

def level_fractions(images):
    return [float(np.mean((images >= lo) & (images <= hi))) for lo, hi in BINS]

@click.command()
@click.argument('paths', nargs=-1, required=True)
@click.option('--num', default=2000, show_default=True, help='Images per set')
def main(paths, num):
    print('| images | n | ' + ' | '.join(f'{lo}' if lo == hi else f'{lo}-{hi}' for lo, hi in BINS) + ' |')
    print('|---' * (len(BINS) + 2) + '|')
    for path in paths:
        if not os.path.exists(path):
            raise click.BadParameter(f'{path}: no such file or folder', param_hint='PATHS')
        images = read_images(path, num)
        print(f'| {path} | {len(images)} | ' + ' | '.join(f'{100 * f:.1f}%' for f in level_fractions(images)) + ' |')

if __name__ == '__main__':
    sys.exit(main()) # pylint: disable=no-value-for-parameter
