"""dataset_tool.py -> training/dataset.py round trips, the EDM dataset semantics, and the one-line
errors a user can cause."""

import gzip
import json
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import ImageFolderDataset

def _tool(*args):
    return CliRunner().invoke(dataset_tool.main, [str(a) for a in args])

def _one_line_error(result, *words):
    text = result.output
    assert result.exit_code != 0, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in text
    assert len(text.strip().splitlines()) == 1, text
    for word in words:
        assert word in text, text

def _all_items(dataset):
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return np.stack(images), np.stack(labels)

@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """Six 8x8 RGB images in nested folders with labels; returned in sorted-name order."""
    root = tmp_path_factory.mktemp('folder')
    rng = np.random.RandomState(1)
    names = ['a/x0.png', 'a/x1.png', 'b/c/y0.png', 'b/y1.png', 'z0.png', 'z1.png']
    images = rng.randint(0, 256, size=[len(names), 8, 8, 3]).astype(np.uint8)
    labels = [3, 0, 1, 3, 2, 0]
    for name, image in zip(names, images):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(image).save(root / name)
    (root / 'notes.txt').write_text('not an image')
    (root / 'dataset.json').write_text(json.dumps(dict(labels=[[n, l] for n, l in zip(names, labels)])))
    return dict(path=root, images=images.transpose(0, 3, 1, 2), labels=np.array(labels))

def _fake_mnist(path, sizes=(5, 3, 4), seed=0):
    """A tiny file in mnist.pkl.gz's layout: ((x, y), (x, y), (x, y)), x in steps of 1/256."""
    rng = np.random.RandomState(seed)
    parts = []
    for n in sizes:
        x = rng.randint(0, 256, size=[n, 784]).astype(np.float32) / 256
        parts.append((x, rng.randint(0, 10, size=[n]).astype(np.int64)))
    with gzip.open(path, 'wb') as f:
        pickle.dump(tuple(parts), f)
    return parts

@pytest.mark.parametrize('dest_name', ['data.zip', 'data_dir'])
def test_folder_round_trip(tmp_path, folder, dest_name):
    dest = tmp_path / dest_name
    result = _tool('--source', folder['path'], '--dest', dest)
    assert result.exit_code == 0, result.output
    assert 'Wrote 6 images (8x8, 3 channel(s), labels: yes)' in result.output

    dataset = ImageFolderDataset(str(dest), use_labels=True)
    assert (len(dataset), dataset.resolution, dataset.num_channels) == (6, 8, 3)
    assert dataset.image_shape == [3, 8, 8] and dataset.label_shape == [4]
    assert dataset.label_dim == 4 and dataset.has_labels
    assert dataset.name == dest_name.split('.')[0]
    images, labels = _all_items(dataset)
    assert images.dtype == np.uint8 and labels.dtype == np.float32
    np.testing.assert_array_equal(images, folder['images'])
    np.testing.assert_array_equal(labels, np.eye(4, dtype=np.float32)[folder['labels']])

def test_zip_layout(tmp_path, folder):
    dest = tmp_path / 'data.zip'
    assert _tool('--source', folder['path'], '--dest', dest).exit_code == 0
    with zipfile.ZipFile(dest) as z:
        infos = z.infolist()
        assert all(info.compress_type == zipfile.ZIP_STORED for info in infos)
        names = [info.filename for info in infos]
        assert names[:2] == ['00000/img00000000.png', '00000/img00000001.png']
        meta = json.loads(z.read('dataset.json'))
    assert meta['labels'][5] == ['00000/img00000005.png', 0]
    assert not list(tmp_path.glob('.*tmp*')) # the temporary file was renamed

def test_mnist_like_source(tmp_path):
    parts = _fake_mnist(tmp_path / 'mnist.pkl.gz')
    dest = tmp_path / 'mnist.zip'
    result = _tool('--source', f'mnist:{tmp_path / "mnist.pkl.gz"}', '--split', 'train', '--dest', dest)
    assert result.exit_code == 0, result.output
    assert 'Wrote 8 images (32x32, 1 channel(s), labels: yes)' in result.output

    x = np.concatenate([parts[0][0], parts[1][0]])
    y = np.concatenate([parts[0][1], parts[1][1]])
    expected = np.zeros([8, 1, 32, 32], dtype=np.uint8) # zero (black) border around 28x28
    expected[:, 0, 2:30, 2:30] = np.rint(x * 256).reshape(-1, 28, 28)
    dataset = ImageFolderDataset(str(dest), use_labels=True)
    images, labels = _all_items(dataset)
    np.testing.assert_array_equal(images, expected)
    assert dataset.label_dim == int(y.max()) + 1
    np.testing.assert_array_equal(labels.argmax(1), y)
    assert np.all(labels.sum(1) == 1)

    # Without labels the loader gives label_dim 0; --max-images keeps the first ones.
    assert ImageFolderDataset(str(dest)).label_dim == 0
    small = tmp_path / 'small.zip'
    assert _tool('--source', f'mnist:{tmp_path / "mnist.pkl.gz"}', '--max-images', 3, '--dest', small).exit_code == 0
    np.testing.assert_array_equal(_all_items(ImageFolderDataset(str(small)))[0], expected[:3])

def test_max_size_and_xflip(tmp_path):
    _fake_mnist(tmp_path / 'm.pkl.gz', sizes=(20, 5, 5))
    dest = tmp_path / 'm.zip'
    assert _tool('--source', f'mnist:{tmp_path / "m.pkl.gz"}', '--resolution', 8, '--dest', dest).exit_code == 0
    full = ImageFolderDataset(str(dest), use_labels=True)
    all_images, all_labels = _all_items(full)
    assert all_images.shape == (30, 1, 8, 8)

    # The subset is RandomState(seed % 2**31)'s shuffle, sorted: the same every time.
    sub = ImageFolderDataset(str(dest), use_labels=True, max_size=7, random_seed=2**31 + 5)
    keep = np.arange(30)
    np.random.RandomState(5).shuffle(keep)
    keep = np.sort(keep[:7])
    images, labels = _all_items(sub)
    np.testing.assert_array_equal(images, all_images[keep])
    np.testing.assert_array_equal(labels, all_labels[keep])
    again = ImageFolderDataset(str(dest), use_labels=True, max_size=7, random_seed=5)
    np.testing.assert_array_equal(_all_items(again)[0], images)
    assert sub.label_dim == full.label_dim # label_dim comes from all labels, not the subset

    flipped = ImageFolderDataset(str(dest), use_labels=True, xflip=True)
    assert len(flipped) == 60
    for i in (0, 29):
        np.testing.assert_array_equal(flipped[30 + i][0], all_images[i][:, :, ::-1])
        np.testing.assert_array_equal(flipped[30 + i][1], all_labels[i])
        np.testing.assert_array_equal(flipped[i][0], all_images[i])

def test_zip_handle_not_pickled(tmp_path):
    _fake_mnist(tmp_path / 'm.pkl.gz')
    dest = tmp_path / 'm.zip'
    assert _tool('--source', f'mnist:{tmp_path / "m.pkl.gz"}', '--dest', dest).exit_code == 0
    dataset = ImageFolderDataset(str(dest), cache=True)
    first = dataset[0][0]
    clone = pickle.loads(pickle.dumps(dataset)) # what DataLoader workers receive
    assert clone._zipfile is None
    np.testing.assert_array_equal(clone[1][0], dataset[1][0])
    np.testing.assert_array_equal(clone[0][0], first)

def test_bad_inputs(tmp_path):
    def folder_of(name, *images):
        root = tmp_path / name
        root.mkdir()
        for i, image in enumerate(images):
            PIL.Image.fromarray(image).save(root / f'{i}.png')
        return root

    gray8, rgb8 = np.zeros([8, 8], np.uint8), np.zeros([8, 8, 3], np.uint8)
    _one_line_error(_tool('--source', folder_of('nonsquare', np.zeros([8, 4], np.uint8)),
        '--dest', tmp_path / 'a.zip'), 'square')
    _one_line_error(_tool('--source', folder_of('mixed', gray8, rgb8), '--dest', tmp_path / 'b.zip'),
        '1.png', 'same size and channels')
    _one_line_error(_tool('--source', folder_of('npot', np.zeros([12, 12], np.uint8)),
        '--dest', tmp_path / 'c.zip'), 'power of two')
    _one_line_error(_tool('--source', folder_of('rgba', np.zeros([8, 8, 4], np.uint8)),
        '--dest', tmp_path / 'd.zip'), 'RGBA')
    _one_line_error(_tool('--source', folder_of('ok', gray8), '--resolution', 12,
        '--dest', tmp_path / 'e.zip'), '--resolution 12')
    _one_line_error(_tool('--source', tmp_path / 'missing', '--dest', tmp_path / 'f.zip'), 'missing')
    _one_line_error(_tool('--source', 'mnist:' + str(tmp_path / 'no.pkl.gz'), '--dest', tmp_path / 'g.zip'),
        'no such file')
    (tmp_path / 'junk.pkl.gz').write_bytes(b'not gzip')
    _one_line_error(_tool('--source', 'mnist:' + str(tmp_path / 'junk.pkl.gz'), '--dest', tmp_path / 'h.zip'),
        'not an MNIST pickle')
    assert not list(tmp_path.glob('*.zip')) and not list(tmp_path.glob('.*tmp*')) # nothing half-written

def test_digits_without_sklearn_says_how_to_install(tmp_path):
    try:
        import sklearn # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        _one_line_error(_tool('--source', 'digits', '--dest', tmp_path / 'd.zip'), 'pip install scikit-learn')
        return
    result = _tool('--source', 'digits', '--resolution', 16, '--dest', tmp_path / 'd.zip')
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(str(tmp_path / 'd.zip'), use_labels=True)
    assert (dataset.resolution, dataset.num_channels, dataset.label_dim) == (16, 1, 10)

def test_loader_errors(tmp_path):
    with pytest.raises(IOError, match='no such file'):
        ImageFolderDataset(str(tmp_path / 'nothing.zip'))
    (tmp_path / 'data.tar').write_bytes(b'')
    with pytest.raises(IOError, match='directory or a .zip'):
        ImageFolderDataset(str(tmp_path / 'data.tar'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(IOError, match='no image files'):
        ImageFolderDataset(str(tmp_path / 'empty'))
