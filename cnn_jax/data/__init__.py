"""Input side: sources (files, archives, TFDS, synthetic), host augmentation, and the
grain pipeline that feeds sharded batches to the devices."""
from cnn_jax.data.sources import (Arrays, DataError, load, load_arrays, search_dirs,
                                 stratified_holdout)

__all__ = ["Arrays", "DataError", "load", "load_arrays", "search_dirs", "stratified_holdout"]
