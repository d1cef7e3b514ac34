"""Trains the SentencePiece model shipped as pausejax/assets/spm/shakespeare_8k.model.

A unigram model with 8000 pieces, trained on the train split of the embedded Shakespeare corpus
only (never on validation text). Ids follow seqio's conventions: pad=0, eos=1, unk=2, no bos.

Unlike the usual NFKC setup, text is not normalized and whitespace is kept as is, and the newline
is a piece of its own: verse line breaks and the blank lines between speeches survive
encode/decode. Characters outside the pieces fall back to their UTF-8 bytes, so any text
round-trips exactly.

  python scripts/train_tokenizer.py

Training runs on one thread over the documents in file order, so reruns give the same model.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import pathlib

import sentencepiece as spm

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "pausejax" / "assets"
VOCAB_SIZE = 8000
SEED = 0


def train_texts(path: pathlib.Path) -> list[str]:
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(line)["text"] for line in f]


def train(texts: list[str], vocab_size: int = VOCAB_SIZE) -> bytes:
  """Returns the serialized model proto."""
  spm.set_random_generator_seed(SEED)
  model = io.BytesIO()  # In memory: no output path gets recorded in the model's trainer_spec.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=model,
      model_type="unigram",
      vocab_size=vocab_size,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      byte_fallback=True,
      character_coverage=1.0,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      user_defined_symbols=["\n"],
      max_sentence_length=1 << 16,  # Documents are whole scenes, not lines.
      input_sentence_size=0,  # Use every document...
      shuffle_input_sentence=False,  # ...in file order.
      num_threads=1,
      minloglevel=2,
  )
  return model.getvalue()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--train", type=pathlib.Path, default=ASSETS / "shakespeare" / "train.jsonl.gz")
  parser.add_argument("--out", type=pathlib.Path, default=ASSETS / "spm" / "shakespeare_8k.model")
  parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
  args = parser.parse_args(argv)
  if not str(args.out).endswith(".model"):
    parser.error(f"--out={args.out} must end in .model")
  os.makedirs(args.out.parent, exist_ok=True)
  texts = train_texts(args.train)
  args.out.write_bytes(train(texts, args.vocab_size))
  print(f"wrote {args.out} ({args.vocab_size} pieces, trained on {len(texts)} documents)")


if __name__ == "__main__":
  main()
