r"""Attention maps of a trained run: where each layer's attention goes on one prompt.

    python -m pausejax.attention_maps --workdir=runs/tiny --prompt="ROMEO: Is it day?" \
        --outdir=maps [--layers=0,2] [--num_pauses=4] [--prefix_lm]

The prompt is encoded with the run's vocabulary after the run's start ids (BOS, `<sink>`, or
nothing: `registry.start_token`), with `--num_pauses` `<pause>` tokens (default: the run's
M_ft) after it, or before it for a run fine-tuned with `pause.position="prepend"`, as
`pausejax.generate` feeds it. For the latest checkpoint it writes

  OUT/layer_<i>.png     the head-averaged attention map of each chosen layer (rows: queries,
                        columns: keys, labelled with the vocabulary's pieces; a zero-sink model
                        gets a first column "<zero>" for the mass that went to its zero key),
  OUT/attention.json    the tokens and, per layer, the shares of attention that go to the first
                        token, to `<sink>` tokens, to `<pause>` tokens and (`model.zero_sink`) to
                        the zero sink, head-averaged and per head; for the chosen layers also the
                        maps themselves, head-averaged and per head,

and prints the per-layer table of those shares. A share is the attention mass of a query on
those keys, averaged over the query positions after the first (the first can only attend to
itself, so it would count 1 for "first" in every layer) and over heads. A leading `<sink>` is
both "first" and "<sink>".

In-process:

  from pausejax import attention_maps
  weights_NxHxLxL = attention_maps.attention_weights(model, tokens_L)
  per_head = attention_maps.shares(weights_NxHxLxL, tokens_L, vocab.sink_id, vocab.pause_id)
  per_layer_pause = per_head['pause'].mean(-1)            # [num_layers]

The maps are of the real computation: the weights are recomputed from the parameters (each
block's attn_norm -> queries and keys with RoPE -> softmax(q k^T / sqrt(K) + mask) in float32,
SoftMax1 with `zero_sink`) while the blocks themselves produce every next layer's input, and
`forward` returns the logits this gives, which are the model's own (the tests check both).
Attention is causal; with `prefix_len` (`--prefix_lm`, default the run's `prefix_lm`) the first
prefix_len tokens also see each other, as in prefix-LM fine-tuning and decoding.

Shape suffixes: N layers, H heads, L tokens, D d_model, K head_dim, V vocabulary rows.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from pausejax import model as model_lib
from pausejax.errors import UsageError
from pausejax.errors import run

JSON_NAME = 'attention.json'
ZERO_LABEL = '<zero>'
# Share name -> table column header.
_COLUMNS = {'first': 'first', 'sink': '<sink>', 'pause': '<pause>', 'zero_sink': 'zero sink'}


def _layer_blocks(model: model_lib.Decoder) -> list[model_lib.Block]:
  """The model's blocks in order; a scanned model's stacked parameters are sliced per layer."""
  if not model.cfg.scan_layers:
    return list(model.blocks)
  graphdef, state = nnx.split(model.blocks)
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
          for i in range(model.cfg.num_layers)]


def _mask_LxL(length: int, prefix_len: int) -> jax.Array:
  """Who may attend to whom: causal, plus both ways within the first `prefix_len` tokens."""
  index_L = jnp.arange(length)
  mask_LxL = index_L[:, None] >= index_L[None, :]
  in_prefix_L = index_L < prefix_len
  return mask_LxL | (in_prefix_L[:, None] & in_prefix_L[None, :])


def softmax_weights(scores_HxLxL: jax.Array, mask_LxL: jax.Array,
                    zero_sink: bool = False) -> jax.Array:
  """Masked softmax over keys, in float32. With `zero_sink` (SoftMax1) an extra logit 0 takes
  part in the normalisation but not in the result, so a row sums to 1 - 1/(1 + sum exp)."""
  scores_HxLxL = jnp.where(mask_LxL, scores_HxLxL.astype(jnp.float32), -jnp.inf)
  peak_HxLx1 = jnp.max(scores_HxLxL, axis=-1, keepdims=True)  # Finite: the diagonal is visible.
  if zero_sink:
    peak_HxLx1 = jnp.maximum(peak_HxLx1, 0.0)
  exp_HxLxL = jnp.exp(scores_HxLxL - peak_HxLx1)
  total_HxLx1 = jnp.sum(exp_HxLxL, axis=-1, keepdims=True)
  if zero_sink:
    total_HxLx1 = total_HxLx1 + jnp.exp(-peak_HxLx1)
  return exp_HxLxL / total_HxLx1


def _attention_scores(block: model_lib.Block, x_1xLxD: jax.Array,
                      positions_1xL: jax.Array) -> jax.Array:
  """q k^T / sqrt(K) of one block, HxLxL float32, from the same projection the block uses."""
  q_1xLxHxK, k_1xLxHxK, _ = block.attn._project(block.attn_norm(x_1xLxD), positions_1xL)
  q_LxHxK, k_LxHxK = q_1xLxHxK[0].astype(jnp.float32), k_1xLxHxK[0].astype(jnp.float32)
  scale = 1.0 / np.sqrt(q_LxHxK.shape[-1])  # jax.nn.dot_product_attention's default.
  return jnp.einsum('lhk,shk->hls', q_LxHxK, k_LxHxK) * scale


def forward(model: model_lib.Decoder, tokens_L: Sequence[int],
            prefix_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(float32 next-token logits LxV, float32 attention weights NxHxLxL) of one sequence.

  Runs eagerly, op by op like an unjitted `model(tokens)`, so an unscanned model's logits come
  out bit for bit. With `zero_sink`, 1 - a row's sum is the mass its zero key took.
  """
  cfg = model.cfg
  tokens_1xL = jnp.asarray(np.asarray(tokens_L, np.int32)[None])
  length = tokens_1xL.shape[1]
  if length < 1:
    raise ValueError('no tokens')
  if cfg.max_len is not None and length > cfg.max_len:
    raise ValueError(f'sequence length {length} exceeds max_len {cfg.max_len}')
  positions_1xL = jnp.arange(length)[None]
  mask_LxL = _mask_LxL(length, prefix_len)
  # The model's own mask argument: None (its plain causal path) unless there is a prefix.
  model_mask = None
  if prefix_len:
    prefix_1xL = (jnp.arange(length) < prefix_len)[None].astype(jnp.int32)
    model_mask = model_lib.attention_mask(length, None, prefix_1xL)
  zero_sink = getattr(cfg, 'zero_sink', False)

  x_1xLxD = model._embed(tokens_1xL)
  weights = []
  for block in _layer_blocks(model):
    scores_HxLxL = _attention_scores(block, x_1xLxD, positions_1xL)
    weights.append(softmax_weights(scores_HxLxL, mask_LxL, zero_sink))
    # The block itself, not a re-implementation, makes the next layer's input.
    x_1xLxD = block(x_1xLxD, positions_1xL, model_mask)
  logits_LxV = model._logits(x_1xLxD)[0]
  return np.asarray(logits_LxV, np.float32), np.asarray(jnp.stack(weights), np.float32)


def attention_weights(model: model_lib.Decoder, tokens_L: Sequence[int],
                      prefix_len: int = 0) -> np.ndarray:
  """Float32 NxHxLxL: weights[n, h, q, k] = layer n, head h's attention of query q on key k."""
  return forward(model, tokens_L, prefix_len)[1]


def shares(weights_NxHxLxL: np.ndarray, tokens_L: Sequence[int], sink_id: int, pause_id: int,
           zero_sink: bool = False) -> dict[str, np.ndarray]:
  """Per-head shares of attention, each NxH: the attention mass on the first token ('first'),
  on `<sink>` tokens ('sink'), on `<pause>` tokens ('pause') and, with `zero_sink`, on the zero
  key ('zero_sink': 1 - the row sum), averaged over the query positions after the first.
  `.mean(-1)` averages over heads (the mean over queries commutes with it)."""
  weights_NxHxLxL = np.asarray(weights_NxHxLxL, np.float64)
  tokens_L = np.asarray(tokens_L)
  length = weights_NxHxLxL.shape[-1]
  if weights_NxHxLxL.shape[-2] != length or tokens_L.shape != (length,):
    raise ValueError(f'weights {weights_NxHxLxL.shape} do not match {tokens_L.shape[0]} tokens')
  if length < 2:
    raise ValueError('shares need at least 2 tokens: they average the queries after the first')
  rows_NxHxQxL = weights_NxHxLxL[:, :, 1:]
  on = lambda keys_L: rows_NxHxQxL[..., keys_L].sum(-1).mean(-1)
  out = {'first': rows_NxHxQxL[..., 0].mean(-1),
         'sink': on(tokens_L == sink_id),
         'pause': on(tokens_L == pause_id)}
  if zero_sink:
    out['zero_sink'] = 1.0 - rows_NxHxQxL.sum(-1).mean(-1)
  return out


def token_labels(vocabulary, tokens_L: Sequence[int]) -> list[str]:
  """One label per token: its SentencePiece piece ('▁' shown as '_'), specials as `<pause>`,
  `<sink>`, `<backspace>`, the start id 0 as BOS and EOS as `</s>`."""
  special = {vocabulary.pause_id: '<pause>', vocabulary.sink_id: '<sink>',
             vocabulary.backspace_id: '<backspace>'}
  tokenizer = vocabulary.base.tokenizer
  labels = []
  for token in (int(t) for t in tokens_L):
    if token in special:
      labels.append(special[token])
    elif token == vocabulary.pad_id:
      labels.append('BOS')  # seqio's shifted-in start id (the pad id).
    elif token == vocabulary.eos_id:
      labels.append('</s>')
    elif token >= vocabulary.base_vocab_size:
      labels.append(f'<unused_{token}>')
    else:
      labels.append(tokenizer.id_to_piece(token).replace('\u2581', '_'))
  return labels


def plot_layer(weights_HxLxL: np.ndarray, labels: Sequence[str], path: str, title: str,
               zero_sink: bool = False) -> None:
  """A PNG heat map of the head-averaged weights; masked (future) cells stay blank."""
  import matplotlib
  matplotlib.use('Agg')  # Files only; no display needed.
  from matplotlib import pyplot as plt

  map_LxL = np.asarray(weights_HxLxL, np.float64).mean(0)
  # Blank the masked future; prefix-LM rows that see later tokens keep their (nonzero) mass.
  future_LxL = np.triu(np.ones(map_LxL.shape, bool), k=1) & (map_LxL == 0)
  map_LxL = np.where(future_LxL, np.nan, map_LxL)
  rows = list(labels)
  columns = list(labels)
  if zero_sink:
    zero_Lx1 = 1.0 - np.asarray(weights_HxLxL, np.float64).sum(-1).mean(0)[:, None]
    map_LxL = np.concatenate([zero_Lx1, map_LxL], axis=1)
    columns = [ZERO_LABEL] + columns
  # Escape '$' so matplotlib does not read a piece as mathtext.
  escape = lambda texts: [t.replace('$', r'\$') for t in texts]
  size = float(np.clip(0.22 * len(columns) + 2.5, 4.0, 40.0))
  every = max(1, int(np.ceil(len(columns) / 160)))  # Past ~160 ticks, label every k-th.
  fig, ax = plt.subplots(figsize=(size + 1.0, size))
  cmap = matplotlib.colormaps['viridis'].with_extremes(bad='white')
  image = ax.imshow(np.ma.masked_invalid(map_LxL), cmap=cmap, vmin=0.0, vmax=1.0,
                    interpolation='nearest')
  ax.set_xticks(range(0, len(columns), every))
  ax.set_xticklabels(escape(columns[::every]), rotation=90, fontsize=7)
  ax.set_yticks(range(0, len(rows), every))
  ax.set_yticklabels(escape(rows[::every]), fontsize=7)
  ax.set_xlabel('key')
  ax.set_ylabel('query')
  ax.set_title(title, fontsize=9)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def format_table(shares_NxH: dict[str, np.ndarray]) -> str:
  """Per-layer (head-averaged) shares, one row per layer."""
  names = list(shares_NxH)
  widths = [max(9, len(_COLUMNS[n]) + 2) for n in names]
  lines = ['layer' + ''.join(f'{_COLUMNS[n]:>{w}}' for n, w in zip(names, widths))]
  for layer in range(next(iter(shares_NxH.values())).shape[0]):
    lines.append(f'{layer:>5}' + ''.join(f'{shares_NxH[n][layer].mean():>{w}.3f}'
                                         for n, w in zip(names, widths)))
  return '\n'.join(lines)


def _rounded(x: np.ndarray):
  return np.round(np.asarray(x, np.float64), 6).tolist()


def _parse_layers(text: Sequence[str] | None, num_layers: int) -> list[int]:
  if not text:
    return list(range(num_layers))
  layers = []
  for item in text:
    try:
      layer = int(item)
    except ValueError:
      layer = -1
    if not 0 <= layer < num_layers:
      raise UsageError.setting('--layers', ','.join(text),
                               f'comma-separated layer indices in 0..{num_layers - 1}')
    if layer not in layers:
      layers.append(layer)
  return layers


def define_flags() -> None:
  """Flags of the CLI only, so other modules can import this one."""
  config_flags.DEFINE_config_file(
      'config', None, 'Only for runs without config.json: the training config with the same '
      'overrides.')
  flags.DEFINE_string('workdir', None, 'Training run directory holding checkpoints/.')
  flags.DEFINE_string('prompt', None, 'The prompt text.')
  flags.DEFINE_string('outdir', None, 'Where the PNGs and attention.json go (created).')
  flags.DEFINE_list('layers', None, 'Layers to draw, e.g. 0,2 (default: all). The JSON and '
                    'the table cover every layer.')
  flags.DEFINE_integer('num_pauses', None, '<pause> tokens with the prompt (default: the run\'s '
                       'pause.num_finetune).')
  flags.DEFINE_bool('prefix_lm', None, 'Prompt and pauses attend both ways (default: the run\'s '
                    'prefix_lm).')


def main(argv):
  if len(argv) > 1:
    raise UsageError(f'unexpected arguments {argv[1:]}; give the prompt with --prompt=...')
  f = flags.FLAGS
  if not f.workdir:
    raise UsageError.setting('--workdir', f.workdir, 'give the training run directory')
  if not f.prompt:
    raise UsageError.setting('--prompt', f.prompt, 'give the prompt text')
  if not f.outdir:
    raise UsageError.setting('--outdir', f.outdir, 'give a directory for the maps')
  from pausejax.errors import check_writable_dir
  outdir = check_writable_dir(f.outdir, '--outdir')
  # Imported here: the checks above answer without loading TensorFlow, SeqIO and Orbax.
  from pausejax import build
  from pausejax import checkpoint
  from pausejax import config as config_lib
  from pausejax import data as data_lib
  from pausejax import registry
  from pausejax import sinks
  from pausejax import specials

  checkpoint.run_checkpoint_dir(f.workdir)  # Train first: said before anything else.
  config = config_lib.for_reading(f.workdir, f.config)
  layers = _parse_layers(f.layers, config.model.num_layers)
  num_pauses = config.pause.num_finetune if f.num_pauses is None else f.num_pauses
  if num_pauses < 0:
    raise UsageError.setting('--num_pauses', num_pauses, 'an integer >= 0')
  prefix_lm = bool(config.prefix_lm if f.prefix_lm is None else f.prefix_lm)
  vocabulary = specials.load_vocabulary(data_lib.vocab_path(config))
  start = registry.start_token(config)
  start_L = sinks.start_ids(start, vocabulary.sink_id)
  pauses_L = [vocabulary.pause_id] * num_pauses
  if config.pause.position == 'prepend':  # Right after the start, as fine-tuning put them.
    tokens_L = start_L + pauses_L + list(vocabulary.encode(f.prompt))
  else:
    tokens_L = start_L + list(vocabulary.encode(f.prompt)) + pauses_L
  if len(tokens_L) < 2:
    raise UsageError.setting('--prompt', f.prompt, 'at least 2 tokens with the start and '
                             'pauses (shares average the queries after the first)')
  if len(tokens_L) > config.seq_len:
    raise UsageError.setting('--prompt', f.prompt, f'{len(tokens_L)} tokens with the start and '
                             f'pauses; at most seq_len={config.seq_len}')

  rows = specials.padded_vocab_size(vocabulary.vocab_size)
  model, step = build.restore_model(config, f.workdir, rows, vocabulary.pause_id)
  zero_sink = bool(getattr(model.cfg, 'zero_sink', False))
  weights_NxHxLxL = attention_weights(model, tokens_L, len(tokens_L) if prefix_lm else 0)
  shares_NxH = shares(weights_NxHxLxL, tokens_L, vocabulary.sink_id, vocabulary.pause_id,
                      zero_sink)
  labels = token_labels(vocabulary, tokens_L)
  if jax.process_index() != 0:
    return

  os.makedirs(outdir, exist_ok=True)
  heads = weights_NxHxLxL.shape[1]
  report = {'workdir': f.workdir, 'step': int(step), 'prompt': f.prompt, 'start_token': start,
            'num_pauses': num_pauses, 'pause_position': config.pause.position,
            'prefix_lm': prefix_lm, 'zero_sink': zero_sink, 'tokens': [int(t) for t in tokens_L],
            'labels': labels, 'layers': []}
  written = []
  for layer in range(weights_NxHxLxL.shape[0]):
    entry = {'layer': layer,
             'shares': {n: float(s[layer].mean()) for n, s in shares_NxH.items()},
             'shares_per_head': {n: _rounded(s[layer]) for n, s in shares_NxH.items()}}
    if layer in layers:
      png = os.path.join(outdir, f'layer_{layer}.png')
      name = os.path.basename(os.path.normpath(f.workdir))
      plot_layer(weights_NxHxLxL[layer], labels, png,
                 f'{name} step {step}: layer {layer}, mean of {heads} heads', zero_sink)
      written.append(png)
      entry['png'] = os.path.basename(png)
      entry['weights'] = _rounded(weights_NxHxLxL[layer].mean(0))
      entry['weights_per_head'] = _rounded(weights_NxHxLxL[layer])
    report['layers'].append(entry)
  json_path = os.path.join(outdir, JSON_NAME)
  with open(json_path, 'w') as fp:
    json.dump(report, fp)

  print(f'checkpoint step {step} | {len(tokens_L)} tokens, start {start}, {num_pauses} '
        f'pause(s) | zero_sink {zero_sink} | prefix_lm {prefix_lm}')
  print(format_table(shares_NxH))
  for path in written + [json_path]:
    print(f'wrote {path}', flush=True)


if __name__ == '__main__':
  define_flags()
  run(main)
