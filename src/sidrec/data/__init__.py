"""Data layer: readers -> Dataset -> prepare -> SequenceData (+ synthetic data with known P*)."""

from sidrec.data.dataset import Dataset
from sidrec.data.prepare import SequenceData, prepare
from sidrec.data.readers import read

__all__ = ["Dataset", "SequenceData", "prepare", "read"]
