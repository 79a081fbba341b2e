"""Datasets: scikit-learn digits (embedded), IDX folders, tensorflow-datasets."""

from evojax_merge.data.dataset import Dataset, Split
from evojax_merge.data.digits import load_digits
from evojax_merge.data.idx import load_idx_folder, read_idx
from evojax_merge.data.registry import load_dataset

__all__ = ["Dataset", "Split", "load_dataset", "load_digits", "load_idx_folder", "read_idx"]
