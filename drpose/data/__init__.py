"""DrPose15K-style data: the dataset folder format, its reader and writer, and its builders.

- :mod:`drpose.data.dataset`: the format (``manifest.jsonl`` + images + poses + optional renders),
  :class:`DrPoseDataset` (validates every record on open), :class:`DatasetWriter`,
  :class:`DatasetError`;
- :mod:`drpose.data.synthesize`: synthetic datasets of sampled poses rendered as capsule bodies;
- :mod:`drpose.data.motion`: datasets selected from motion-capture sequences (guidance renders);
- :mod:`drpose.data.preview`: contact sheets for checking a dataset by eye.
"""

from drpose.data.dataset import DatasetError, DatasetWriter, DrPoseDataset, Record

__all__ = ["DatasetError", "DatasetWriter", "DrPoseDataset", "Record"]
