"""Image datasets in the EDM/StyleGAN format: a directory or an uncompressed ZIP of PNGs with an
optional `dataset.json` of labels (see dataset_tool.py, which writes them).

Semantics shared with the NVlabs loaders, so that their `dataset_kwargs` work here:
  * every file with an extension PIL knows is an image, in sorted order;
  * labels come from dataset.json by file name; integer labels become one-hot float32 with
    label_dim = max + 1, 2-D labels are used as they are;
  * `max_size` keeps a random subset (RandomState(random_seed % 2**31), then sorted);
  * `xflip` appends a mirrored copy of every image.
Items are (uint8 CHW numpy image, float32 label).
"""

import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

class Dataset(torch.utils.data.Dataset):
    """Index bookkeeping (subset, mirroring, labels, cache) around a source of raw images."""

    def __init__(self,
        name,                   # Name of the dataset.
        raw_shape,              # Shape of the raw image data (NCHW).
        use_labels  = False,    # Enable conditioning labels? False = label dimension is zero.
        max_size    = None,     # Keep a random subset of at most this many images; None = all.
        xflip       = False,    # Append horizontally mirrored copies of the images?
        random_seed = 0,        # Seed of the random subset.
        cache       = False,    # Keep decoded images in memory?
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = dict() # raw_idx -> image
        self._raw_labels = None
        self._label_shape = None

        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self):
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            if labels is None:
                labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            where = getattr(self, '_path', self._name)
            if not isinstance(labels, np.ndarray) or labels.shape[0] != self._raw_shape[0] \
                    or labels.dtype not in (np.float32, np.int64):
                raise IOError(f'{where}: labels must be one int or one float vector per image')
            if labels.dtype == np.int64 and (labels.ndim != 1 or np.any(labels < 0)):
                raise IOError(f'{where}: class labels must be non-negative integers')
            self._raw_labels = labels
        return self._raw_labels

    # Subclasses provide these.
    def _load_raw_image(self, raw_idx): # -> uint8 CHW
        raise NotImplementedError

    def _load_raw_labels(self): # -> None, int64 [N] or float32 [N, L]
        raise NotImplementedError

    def close(self):
        pass

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = self._raw_idx[idx]
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8
        if list(image.shape) != self.image_shape:
            raise IOError(f'{getattr(self, "_path", self.name)}: image {raw_idx} has shape {list(image.shape)}, '
                f'unlike the first one {self.image_shape}; all images must be alike')
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self): # CHW
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        assert self.image_shape[1] == self.image_shape[2]
        return self.image_shape[1]

    @property
    def label_shape(self):
        if self._label_shape is None:
            raw = self._get_raw_labels()
            if raw.dtype == np.int64:
                self._label_shape = [int(raw.max()) + 1 if raw.size else 0]
            else:
                self._label_shape = list(raw.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self):
        return self.label_shape[0] if self.label_shape else 0

    @property
    def has_labels(self):
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self):
        return self._get_raw_labels().dtype == np.int64

#----------------------------------------------------------------------------

def _file_ext(fname):
    return os.path.splitext(fname)[1].lower()

def image_extensions():
    PIL.Image.init() # registers every plugin, so that EXTENSION is complete
    return set(PIL.Image.EXTENSION)

class ImageFolderDataset(Dataset):
    """A directory or ZIP of images (see the module docstring)."""

    def __init__(self,
        path,                   # Path to a directory or a ZIP file.
        resolution  = None,     # Expected resolution; None = whatever the images have.
        **super_kwargs,         # Arguments of Dataset.
    ):
        self._path = path
        self._zipfile = None
        self._zipfile_pid = None
        if not os.path.exists(path):
            raise IOError(f'{path}: no such file or directory')
        if os.path.isdir(path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=path)
                for root, _dirs, files in os.walk(path) for fname in files}
        elif _file_ext(path) == '.zip':
            self._type = 'zip'
            self._all_fnames = set(self._get_zipfile().namelist())
        else:
            raise IOError(f'{path}: a dataset must be a directory or a .zip file')

        known = image_extensions()
        self._image_fnames = sorted(f for f in self._all_fnames if _file_ext(f) in known)
        if not self._image_fnames:
            raise IOError(f'{path}: no image files found')

        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        raw_shape = [len(self._image_fnames)] + list(self._load_raw_image(0).shape)
        if resolution is not None and (raw_shape[2] != resolution or raw_shape[3] != resolution):
            raise IOError(f'{path}: images are {raw_shape[3]}x{raw_shape[2]}, '
                f'not the requested resolution {resolution}')
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)

    def _get_zipfile(self):
        # One handle per process: an open ZIP must not be shared by DataLoader workers.
        assert self._type == 'zip'
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            try:
                self._zipfile = zipfile.ZipFile(self._path)
            except zipfile.BadZipFile as e:
                raise IOError(f'{self._path}: not a readable ZIP file ({e}); is it truncated?') from None
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def close(self):
        if self._zipfile is not None:
            self._zipfile.close()
        self._zipfile = None

    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None, _zipfile_pid=None)

    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        try:
            with self._open_file(fname) as f:
                image = np.array(PIL.Image.open(f))
        except Exception as e: # PIL raises OSError, SyntaxError, zlib.error, ... for broken files
            raise IOError(f'{self._path}: {fname} is not a readable image ({type(e).__name__}: {e})') from None
        if image.ndim == 2:
            image = image[:, :, np.newaxis] # HW -> HWC
        return image.transpose(2, 0, 1) # HWC -> CHW

    def check_images(self, progress=None):
        """Read every image's header and check its integrity (PIL's verify: PNG chunk CRCs)
        and shape against the first, so that a broken or odd image stops a run before it
        starts, with its name. About a second per 50k small PNGs."""
        first = self.image_shape
        for i, fname in enumerate(self._image_fnames):
            if progress is not None and i and i % 10000 == 0:
                progress(f'checked {i}/{len(self._image_fnames)} images')
            try:
                with self._open_file(fname) as f:
                    image = PIL.Image.open(f)
                    channels = len(image.getbands())
                    shape = [channels, image.height, image.width]
                    image.verify()
            except Exception as e: # pylint: disable=broad-except
                raise IOError(f'{self._path}: {fname} is not a readable image ({type(e).__name__}: {e})') from None
            if shape != first:
                raise IOError(f'{self._path}: {fname} is {shape[2]}x{shape[1]} with {shape[0]} channel(s), '
                    f'unlike the first image ({first[2]}x{first[1]}, {first[0]}); all images must be alike')

    def _load_raw_labels(self):
        fname = 'dataset.json'
        if fname not in self._all_fnames:
            return None
        try:
            with self._open_file(fname) as f:
                labels = json.load(f)['labels']
            if labels is None:
                return None
            labels = dict(labels)
        except (ValueError, KeyError, TypeError) as e:
            raise IOError(f'{self._path}: dataset.json is not {{"labels": [[name, label], ...]}} ({type(e).__name__}: {e})') from None
        try:
            labels = [labels[fname.replace('\\', '/')] for fname in self._image_fnames]
        except KeyError as e:
            raise IOError(f'{self._path}: dataset.json has no label for {e.args[0]}') from None
        labels = np.array(labels)
        if labels.ndim not in (1, 2) or not np.issubdtype(labels.dtype, np.number):
            raise IOError(f'{self._path}: dataset.json labels must be integers or vectors of numbers')
        return labels.astype({1: np.int64, 2: np.float32}[labels.ndim])
