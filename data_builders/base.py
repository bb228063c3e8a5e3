"""The base class of every builder here: a TFDS generator-based builder that writes array_record."""

from __future__ import annotations

from typing import Any

import tensorflow_datasets as tfds


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """A `DatasetInfo` that never looks for precomputed metadata in TFDS's public bucket.

    TFDS constructs a builder's info this way whenever its data_dir holds no prepared version yet, and
    its `initialize_from_bucket` makes a `tempfile.mkdtemp("tfds")` folder before asking the bucket (a
    no-op while TFDS's GCS access is off, as it is by default) and never removes it: one empty
    `/tmp/tmp*tfds` per builder constructed, thousands a day in a test suite. None of these datasets is
    in that bucket, so there is nothing to initialise from.
    """

    def initialize_from_bucket(self) -> None:
        return None


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes array_record unless a `file_format` is given, however the builder is called.

    array_record is what `as_data_source` and grain read; TFDS's own default is tfrecord (which needs
    TensorFlow to read). Not registered with TFDS itself: only the concrete `Builder` classes are.
    """

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def dataset_info_from_configs(self, **kwargs: Any) -> tfds.core.DatasetInfo:
        """TFDS's own (the config files' description and citation win), as a `_LocalDatasetInfo`."""
        metadata = self.get_metadata()
        if metadata.description:
            kwargs["description"] = metadata.description
        if metadata.citation:
            kwargs["citation"] = metadata.citation
        return _LocalDatasetInfo(builder=self, **kwargs)
