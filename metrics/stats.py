"""Feature statistics (mu, sigma) and EDM's reference `.npz` format.

An EDM reference file holds `mu` [D] and `sigma` [D, D], both float64, written with
`np.savez(dest, mu=mu, sigma=sigma)`. sigma is the unbiased covariance (divides by N - 1), as in
EDM's fid.py; StyleGAN's metrics divide by N instead (a relative difference of 1/N).
"""

import os
import zipfile

import numpy as np

import dnnlib

class StatsError(ValueError):
    """A reference file that cannot be used, in one line."""

def feature_stats(features):
    """(mu [D], sigma [D, D]) in float64 of features [N, D], N >= 2.

    sigma = (sum f^T f - N mu mu^T) / (N - 1): EDM's formula (the same sums can be accumulated
    batch by batch).
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f'features must be [N, D], got shape {list(f.shape)}')
    n = f.shape[0]
    if n < 2:
        raise ValueError(f'need at least 2 feature vectors for a covariance, got {n}')
    mu = f.sum(axis=0) / n
    sigma = (f.T @ f - n * np.outer(mu, mu)) / (n - 1)
    return mu, sigma

def save_stats(path, mu, sigma):
    """Write an EDM-compatible .npz at exactly `path`, atomically (temporary file, then rename)."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'mu must be [D] and sigma [D, D], got {list(mu.shape)} and {list(sigma.shape)}')
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f: # a file object, so that numpy does not append '.npz'
            np.savez(f, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def load_stats(path_or_url):
    """(mu, sigma) float64 from an EDM .npz path or URL (downloads are cached); StatsError if
    the file is missing or not in that format."""
    try:
        with dnnlib.util.open_url(path_or_url) as f:
            with np.load(f, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise StatsError(f'{path_or_url}: no such file') from None
    except OSError as e: # includes dnnlib.util.DownloadError
        raise StatsError(f'cannot read {path_or_url}: {e}') from None
    except (ValueError, EOFError, zipfile.BadZipFile) as e: # np.load of something that is not an npz
        raise StatsError(f'{path_or_url} is not an .npz file ({e})') from None
    if 'mu' not in arrays or 'sigma' not in arrays:
        keys = ', '.join(sorted(arrays)) or 'nothing'
        raise StatsError(f"{path_or_url} is not a reference: it needs arrays 'mu' and 'sigma', "
            f'it has {keys}')
    mu, sigma = arrays['mu'], arrays['sigma']
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatsError(f'{path_or_url}: mu must be [D] and sigma [D, D], got '
            f'{list(mu.shape)} and {list(sigma.shape)}')
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise StatsError(f'{path_or_url}: mu and sigma must be floating point, got {mu.dtype} '
            f'and {sigma.dtype}')
    return mu.astype(np.float64), sigma.astype(np.float64)
