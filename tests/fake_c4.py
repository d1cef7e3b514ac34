"""A tiny stand-in for C4 (`c4/en:3.1.0`) in C4's own TFDS format, for tests.

The real C4 cannot be downloaded here (it is built from Common Crawl with Apache Beam), so tests
that exercise the C4 code path write a few documents of their own as `c4/en:3.1.0` with
`write_fake_c4`. Nothing about the layout is invented: the builder below takes the real C4
builder's configs, version and `DatasetInfo` (`tensorflow_datasets/text/c4.py`) and only replaces
the Beam pipeline with a generator over the given texts, so TFDS writes the same files (dataset_info
.json, features.json, c4-<split>.tfrecord-*) that a real `tfds build c4/en:3.1.0` would.
Afterwards `seqio.TfdsDataSource("c4/en:3.1.0", tfds_data_dir=data_dir)` reads it with the real,
registered C4 builder. The texts are whatever the test passes; they are not C4 data.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow_datasets as tfds
from tensorflow_datasets.text import c4

TFDS_NAME = "c4/en:3.1.0"


def _record(text: str, index: int) -> dict[str, str]:
  return {
      "text": text,
      "url": f"https://example.com/fake-c4/{index}",
      "content-type": "text/plain",
      "content-length": str(len(text.encode("utf-8"))),
      "timestamp": "2019-04-25T12:57:54Z",
  }


def write_fake_c4(
    data_dir: str, train_texts: Sequence[str], validation_texts: Sequence[str]
) -> None:
  """Writes `train_texts` and `validation_texts` as the splits of `c4/en:3.1.0` under `data_dir`."""
  splits = {"train": list(train_texts), "validation": list(validation_texts)}

  class FakeC4(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """C4's name, configs, version and info; examples from `splits` instead of Common Crawl."""

    name = c4.C4.name
    BUILDER_CONFIGS = c4.C4.BUILDER_CONFIGS
    _info = c4.C4._info  # pylint: disable=protected-access

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(texts) for split, texts in splits.items()}

    def _generate_examples(self, texts):
      for i, text in enumerate(texts):
        yield i, _record(text, i)

  builder = FakeC4(config="en", version="3.1.0", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
