"""Few-shot data: built-in synthetic domains and loaders for folders, parquet and S3.

See :mod:`trainers.data.synthetic` for the procedural domains and :mod:`trainers.data.sources`
for :func:`load_images` and the data URIs it accepts.
"""

from trainers.data.sources import DataError, load_images, to_tensor
from trainers.data.synthetic import DOMAINS, TARGET_DOMAINS, render

__all__ = ["DOMAINS", "TARGET_DOMAINS", "DataError", "load_images", "render", "to_tensor"]
