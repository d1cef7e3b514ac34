"""Special tokens that pausejax adds after any base vocabulary.

One module owns the mapping so every other part asks here. For a base vocabulary of size V the ids are

  V + 0  `<pause>`      (Goyal et al. 2023: one learnable embedding row)
  V + 1  `<sink>`       (reserved: StreamingLLM's learnable attention sink)
  V + 2  `<backspace>`  (reserved: SequenceMatch's delete action)

so they work with any SentencePiece model, T5's `cc_all.32000` included. The embedding table is then
rounded up to a multiple of 128 rows (`padded_vocab_size`) so it tiles well on TPU; the extra rows are
never produced by the data and are never targets.

Text never turns into a special token: encoding "<pause>" gives ordinary pieces, so a corpus cannot
inject pauses by accident. Only the pause preprocessor writes the id.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from pausejax.errors import UsageError

SPECIAL_TOKENS: tuple[str, ...] = ("<pause>", "<sink>", "<backspace>")
PAUSE, SINK, BACKSPACE = SPECIAL_TOKENS


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
  """Number of embedding rows: `vocab_size` rounded up to a multiple of `multiple`."""
  return -(-vocab_size // multiple) * multiple


class SpecialsVocabulary(seqio.Vocabulary):
  """A seqio vocabulary: a base vocabulary plus the special tokens after it.

  Encoding is the base vocabulary's. Decoding shows special tokens as `<pause>` etc.
  """

  def __init__(self, base: seqio.Vocabulary):
    if base.extra_ids:
      # seqio would place extra ids after the base ids, where ours live; keep one scheme.
      raise ValueError("the base vocabulary must have extra_ids=0")
    self._base = base
    super().__init__(extra_ids=0)

  @property
  def base(self) -> seqio.Vocabulary:
    return self._base

  @property
  def base_vocab_size(self) -> int:
    return self._base.vocab_size

  def special_id(self, token: str) -> int:
    return self.base_vocab_size + SPECIAL_TOKENS.index(token)

  @property
  def pause_id(self) -> int:
    return self.special_id(PAUSE)

  @property
  def sink_id(self) -> int:
    return self.special_id(SINK)

  @property
  def backspace_id(self) -> int:
    return self.special_id(BACKSPACE)

  # seqio.Vocabulary interface.
  @property
  def _base_vocab_size(self) -> int:
    return self.base_vocab_size + len(SPECIAL_TOKENS)

  @property
  def eos_id(self):
    return self._base.eos_id

  @property
  def unk_id(self):
    return self._base.unk_id

  @property
  def pad_id(self) -> int:
    return self._base.pad_id

  def _encode(self, s: str) -> Sequence[int]:
    return self._base.encode(s)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    return self._base.encode_tf(s)

  def _decode(self, ids: Iterable[int]) -> str:
    return self.render(ids, show_eos=False)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    # Decoding for metrics only; keeps the special tokens visible like `decode`.
    def decode_np(ids_np):
      rows = np.asarray(ids_np).reshape(-1, ids_np.shape[-1]) if ids_np.ndim else ids_np[None]
      out = [self.render(r.tolist(), show_eos=False).encode("utf-8") for r in rows]
      return np.array(out, dtype=object).reshape(ids_np.shape[:-1])

    return tf.numpy_function(decode_np, [ids], tf.string, stateful=False)

  def render(self, ids: Iterable[int], *, show_eos: bool = True) -> str:
    """Whole-sequence text: specials as `<pause>`, EOS as `</s>` (optional), padding dropped."""
    ids = [int(i) for i in ids]
    pieces, run = [], []

    def flush():
      if run:
        text = self._base.decode(run)
        if pieces and self._starts_with_space(run[0]):
          text = " " + text  # SentencePiece drops the leading space of a decoded run.
        pieces.append(text)
        run.clear()

    for i in ids:
      if i == self.pad_id:
        continue
      if i >= self.base_vocab_size:
        flush()
        k = i - self.base_vocab_size
        pieces.append(SPECIAL_TOKENS[k] if k < len(SPECIAL_TOKENS) else f"<unused_{i}>")
      elif i == self.eos_id:
        flush()
        if show_eos:
          pieces.append("</s>")
      else:
        run.append(i)
    flush()
    return "".join(pieces)

  def _starts_with_space(self, token_id: int) -> bool:
    tokenizer = getattr(self._base, "tokenizer", None)
    if tokenizer is None:
      return False
    return tokenizer.id_to_piece(token_id).startswith("\u2581")

  def __eq__(self, other) -> bool:
    return isinstance(other, SpecialsVocabulary) and self._base == other._base

  def __hash__(self) -> int:
    return hash((type(self), id(self._base)))

  def __repr__(self) -> str:
    return f"SpecialsVocabulary({self._base!r}, pause_id={self.pause_id})"


def load_vocabulary(vocab_path: str) -> SpecialsVocabulary:
  """The SentencePiece model at `vocab_path` with the special tokens appended."""
  if not vocab_path or not tf.io.gfile.exists(vocab_path):
    raise UsageError.setting(
        "vocab_path", vocab_path,
        "no such SentencePiece model file; give the path of a .model file "
        "(the embedded default is pausejax/assets/spm/shakespeare_8k.model)")
  return SpecialsVocabulary(seqio.SentencePieceVocabulary(vocab_path))



def with_specials(vocabulary: seqio.Vocabulary, *, where: str) -> SpecialsVocabulary:
  """`vocabulary` as a `SpecialsVocabulary`: one already is, a SentencePiece one gets wrapped.

  Anything else is a UsageError naming `where` (e.g. "task my_task, feature 'targets'"): the
  special ids sit right after the base ids, which needs a base without extra ids.
  """
  if isinstance(vocabulary, SpecialsVocabulary):
    return vocabulary
  if isinstance(vocabulary, seqio.SentencePieceVocabulary) and not vocabulary.extra_ids:
    return SpecialsVocabulary(vocabulary)
  got = type(vocabulary).__name__ + (f" with extra_ids={vocabulary.extra_ids}"
                                     if getattr(vocabulary, "extra_ids", 0) else "")
  raise UsageError(
      f"{where} uses {got}; pausejax needs a seqio.SentencePieceVocabulary with extra_ids=0 "
      "(pausejax adds <pause>, <sink> and <backspace> after its ids): register the task with "
      "seqio.SentencePieceVocabulary(path) or pausejax.specials.load_vocabulary(path)")


def with_specials_features(task: seqio.Task) -> dict[str, seqio.Feature]:
  """`task`'s output features with every vocabulary made a `SpecialsVocabulary`."""
  return {k: dataclasses.replace(f, vocabulary=with_specials(
      f.vocabulary, where=f"task {task.name}, feature {k!r}"))
          for k, f in task.output_features.items()}


def model_file(vocabulary: SpecialsVocabulary) -> str:
  """The SentencePiece model file behind `vocabulary`."""
  return vocabulary.base.sentencepiece_model_file
