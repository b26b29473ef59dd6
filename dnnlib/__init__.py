"""Small, dependency-light helpers shared across the toolkit.

`dnnlib.util.EasyDict` is referenced by name inside saved pickles, so the
module path and class name must stay stable.
"""

from . import util
from .util import EasyDict, make_cache_dir_path

__all__ = ["util", "EasyDict", "make_cache_dir_path"]
