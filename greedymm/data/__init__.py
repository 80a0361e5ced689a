"""Where batches come from (SPEC Sec. 1): downloads, the .npy cache, the datasets and the two-view loader."""
from .cache import open_split
from .loader import Loaders, TwoViewLoader, build_loaders, cache_dir_for, prepare_data, split_indices

__all__ = ["Loaders", "TwoViewLoader", "build_loaders", "cache_dir_for", "open_split", "prepare_data",
           "split_indices"]
