"""Input side: record sources (decoded arrays, ImageFolder folders and tars, ArrayRecord,
TFDS, synthetic) behind one interface, preprocessing as named ops, a data spec that
opens any split, and the grain pipeline that feeds sharded batches to the devices."""
from cnn_jax.data.dataset import DataSpec, Dataset, open_split
from cnn_jax.data.sources import (Arrays, DataError, Source, load, open_source, search_dirs,
                                  stratified_holdout)

__all__ = ["Arrays", "DataError", "DataSpec", "Dataset", "Source", "load", "open_source",
           "open_split", "search_dirs", "stratified_holdout"]
