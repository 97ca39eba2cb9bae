"""The errors of the data pipeline: each names the problem and the fix the user must make."""
from __future__ import annotations


class DatasetError(RuntimeError):
    """A dataset problem the user must fix; the message names the problem and the fix."""


class CorruptImageError(DatasetError):
    """An image file that cannot be read or decoded; the message names the file (util.image_io)."""
