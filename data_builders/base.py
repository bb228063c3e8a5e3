"""The base class of every builder here: a TFDS generator-based builder that writes array_record."""

from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes array_record unless a `file_format` is given, however the builder is called.

    array_record is what `as_data_source` and grain read; TFDS's own default is tfrecord (which needs
    TensorFlow to read). Not registered with TFDS itself: only the concrete `Builder` classes are.
    """

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        super().__init__(file_format=file_format or "array_record", **kwargs)
