"""Generate text with a decoder-only LM built from flash_jax.flax.nnx.FlashAttention.

The model is examples/train_lm.py's (imported, not copied): byte tokens, learned
positions, pre-norm blocks. Weights are random, or a checkpoint that
`train_lm.py --save DIR` wrote (--checkpoint DIR). A batch of prompts of different
lengths (windows of the standard library's source) generates with:

  --cache paged       (default) flash_jax.paged_attention over one page pool shared by all
                      sequences, written with flash_jax.write_kv_pages. Continuous
                      batching: --slots sequences run at once; one that finishes frees
                      its pages and the next prompt starts in its slot. A step carries
                      every slot at once: chunks of new prompts (prefill, up to
                      --prefill-chunk tokens) beside one token of each decoding sequence
                      (write_kv_pages's `lengths`: rows add different token counts).
  --cache contiguous  the modules' own decode cache (FlashAttention.init_cache(...,
                      ragged=True): a max_length row per slot, one index per row), with
                      the same scheduler.
  --attention flax    the same model with Flax's nnx.MultiHeadAttention decode cache: one
                      token per call for every row (prompts are fed token by token), a
                      dense mask over max_length, one index shared by the batch, so
                      sequences run in lockstep waves of --slots.

Scheduling, for every cache: the host dispatches a step without waiting for the last
one's samples (a decoding row's input is the last step's output, on the device) and reads
them --read-every steps at a time (Pending); the flash caches run up to --steps-per-call
decode steps in one call while no slot prefills or ends (decode_steps). Weights are held
in the compute dtype.

Sampling: greedy (--temperature 0, the default) or temperature with --top-k. A progress
bar shows tokens/s and time per decode step; the last line sums the run up:
  SUMMARY attention=flash cache=paged ... tokens_per_s=... decode_step_ms=...

  python examples/generate.py                          # CPU, random weights, < 1 minute
  python examples/generate.py --cache contiguous       # the modules' decode cache
  python examples/generate.py --attention flax         # Flax's own decode cache
  python examples/generate.py --check                  # greedy == full-forward recomputation
  python examples/train_lm.py --steps 300 --save /tmp/lm && \\
      python examples/generate.py --checkpoint /tmp/lm --temperature 0.8 --top-k 20 --show 2
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

import flash_jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_lm  # noqa: E402  (the model and the corpus)

CACHES = ("paged", "contiguous")
ATTENTIONS = ("flash", "flax")


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy
  top_k: int | None = None


@dataclasses.dataclass
class Request:
  prompt: np.ndarray  # int32 [prompt_len]
  max_new_tokens: int
  generated: list = dataclasses.field(default_factory=list)  # values, one step behind
  produced: int = 0  # new tokens sampled so far (the host knows counts before values)

  @property
  def total(self) -> int:
    return len(self.prompt) + self.max_new_tokens


# ---- the model ---------------------------------------------------------------------------

def load_model(config: train_lm.ModelConfig, checkpoint: str | None, seed: int):
  model = train_lm.LanguageModel(config, nnx.Rngs(seed))
  if checkpoint is not None:
    params = nnx.state(model, nnx.Param)
    saved = (pathlib.Path(checkpoint) / "params.msgpack").read_bytes()
    nnx.replace_by_pure_dict(params, serialization.msgpack_restore(saved))
    nnx.update(model, params)
  return model


def read_checkpoint_config(checkpoint: str) -> dict:
  return json.loads((pathlib.Path(checkpoint) / "config.json").read_text())


def logits_at(model, tokens, positions, last, attend):
  """The decoder of train_lm.LanguageModel with a pluggable attention: next-token logits.

  tokens, positions: int32 [B, T]; last: int32 [B], the row of each sequence's newest
  real token; attend(layer, attention_module, h [B, T, D]) -> [B, T, D] reads and
  writes the cache. Returns float32 [B, vocab].
  """
  x = model.token_embed(tokens) + model.position_embed(positions)  # [B, T, D]
  for layer, block in enumerate(model.blocks):  # train_lm.Block, with its attention swapped
    x = x + attend(layer, block.attention.attention, block.attention_norm(x))
    x = x + block.mlp_out(jax.nn.gelu(block.mlp_in(block.mlp_norm(x))))
  x = x[jnp.arange(x.shape[0]), last]  # [B, D]
  return model.token_embed.attend(model.final_norm(x)).astype(jnp.float32)  # tied embedding


def sample(logits, rng, sampling: Sampling):
  """[B, vocab] float32 -> int32 [B]: argmax, or a draw at `temperature` from the top k."""
  if sampling.temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits >= kth, logits, -1e30)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def step_tokens(tokens, previous, use_previous):
  """tokens int32 [B, T] from the host; previous int32 [B], the last step's samples; each
  row whose use_previous is set (a decoding row) takes previous as its token. The host
  thus never needs a step's samples to dispatch the next one (see Pending)."""
  return tokens.at[:, 0].set(jnp.where(use_previous, previous, tokens[:, 0]))


def positions_for(lengths, new_tokens: int, max_context: int):
  """[B] tokens already cached -> positions [B, T] of the new ones (padding clipped)."""
  return jnp.minimum(lengths[:, None] + jnp.arange(new_tokens, dtype=jnp.int32)[None, :],
                     max_context - 1)


# ---- caches: a jitted step per cache -------------------------------------------------------

class PagedCache:
  """A page pool per layer ([P, page_size, Nkv, H], token-major) and the host's page
  allocator: a free list, and one block-table row per slot."""

  def __init__(self, config, slots: int, num_pages: int, page_size: int, dtype):
    self.page_size = page_size
    self.pages_per_seq = -(-config.seq_len // page_size)
    shape = (num_pages, page_size, config.kv_heads, config.head_dim)
    self.arrays = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                        for _ in range(config.layers))
    self.tables = np.zeros((slots, self.pages_per_seq), np.int32)  # unused entries: page 0
    self.free = list(range(num_pages))
    self.owned = [[] for _ in range(slots)]
    self.bytes = 2 * config.layers * math.prod(shape) * jnp.dtype(dtype).itemsize

  def pages_for(self, tokens: int) -> int:
    return -(-tokens // self.page_size)

  def admit(self, slot: int, tokens: int) -> bool:
    """Reserves the pages of a sequence of `tokens` tokens in `slot`; False if the pool is short."""
    needed = self.pages_for(tokens)
    if needed > len(self.free):
      return False
    self.owned[slot] = [self.free.pop() for _ in range(needed)]
    self.tables[slot] = 0
    self.tables[slot, :needed] = self.owned[slot]
    return True

  def release(self, slot: int):
    self.free.extend(self.owned[slot])
    self.owned[slot] = []


def serving_weights(params, dtype):
  """The parameters in the compute dtype, as a serving engine holds them: a step then
  reads half the bytes and casts nothing (the model keeps its float32 copy). The steps
  take them, and the module caches, as leaves: a call with an nnx.State flattens it in
  Python, which for this model's 115 parameters costs more host time (~0.7 ms) than the
  GPU spends on a decode step."""
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, params)


def step_operands(model, dtype):
  """(graphdef, params, params_def, cache, cache_def): the model split for the steps,
  its weights in the compute dtype (serving_weights) and its parameters and module caches
  (none for the paged cache) as leaves with their tree definitions."""
  graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
  params, params_def = jax.tree.flatten(serving_weights(params, dtype))
  cache, cache_def = jax.tree.flatten(cache)
  return graphdef, params, params_def, cache, cache_def


def make_paged_step(graphdef, params_def, sampling: Sampling, max_context: int,
                    implementation):
  """One step over the paged cache (the scheduler jits it: run_continuous)."""
  def step(params, pages, tables, lengths, tokens, counts, previous, use_previous, rng,
           step_index):
    """params: leaves of params_def; pages: per layer (k_pages, v_pages); tables int32
    [S, pages_per_seq]; lengths [S] tokens cached; tokens [S, T] (see step_tokens), of
    which row s adds counts[s] (0: an idle slot)."""
    model = nnx.merge(graphdef, jax.tree.unflatten(params_def, params))
    tokens = step_tokens(tokens, previous, use_previous)
    written = []

    def attend(layer, attention, h):  # [S, T, D]
      q, k, v = attention.query(h), attention.key(h), attention.value(h)  # [S, T, N, H]
      k_pages, v_pages = flash_jax.write_kv_pages(*pages[layer], tables, lengths, k, v,
                                                  lengths=counts)
      written.append((k_pages, v_pages))
      out = flash_jax.paged_attention(q, k_pages, v_pages, tables, lengths + counts,
                                      q_offset=lengths, implementation=implementation)
      return attention.out(out)

    positions = positions_for(lengths, tokens.shape[1], max_context)
    logits = logits_at(model, tokens, positions, jnp.maximum(counts - 1, 0), attend)
    return tuple(written), sample(logits, jax.random.fold_in(rng, step_index), sampling)

  return step


def init_module_caches(model, slots: int, max_context: int, dtype, ragged: bool):
  for block in model.blocks:
    attention = block.attention.attention
    if ragged:
      attention.init_cache((slots, max_context, attention.in_features), dtype, ragged=True)
    else:
      attention.init_cache((slots, max_context, attention.in_features), dtype)


def make_contiguous_step(graphdef, params_def, cache_def, sampling: Sampling,
                         max_context: int):
  """One step over the modules' own caches (the scheduler jits it: run_continuous)."""
  def step(params, cache, tables, lengths, tokens, counts, previous, use_previous, rng,
           step_index):
    """The modules' own decode cache (leaves of cache_def's nnx.Cache state, one row per
    slot)."""
    del tables
    model = nnx.merge(graphdef, jax.tree.unflatten(params_def, params),
                      jax.tree.unflatten(cache_def, cache))
    tokens = step_tokens(tokens, previous, use_previous)

    def attend(layer, attention, h):
      attention.cache_index[...] = lengths  # the host's view: a reused slot restarts at 0
      return attention(h, decode=True, lengths=counts)

    positions = positions_for(lengths, tokens.shape[1], max_context)
    logits = logits_at(model, tokens, positions, jnp.maximum(counts - 1, 0), attend)
    next_tokens = sample(logits, jax.random.fold_in(rng, step_index), sampling)
    return jax.tree.leaves(nnx.state(model, nnx.Cache)), next_tokens

  return step


def make_flax_step(graphdef, params_def, cache_def, sampling: Sampling, max_context: int):
  """One step over Flax's decode caches (the scheduler jits it: run_lockstep)."""
  def step(params, cache, position, tokens, previous, use_previous, rng, step_index):
    """nnx.MultiHeadAttention's decode cache: tokens [B, 1] (see step_tokens) at one
    shared position."""
    model = nnx.merge(graphdef, jax.tree.unflatten(params_def, params),
                      jax.tree.unflatten(cache_def, cache))
    tokens = step_tokens(tokens, previous, use_previous)
    attend = lambda layer, attention, h: attention(h, decode=True)
    positions = jnp.full(tokens.shape, jnp.minimum(position, max_context - 1), jnp.int32)
    logits = logits_at(model, tokens, positions, jnp.zeros(tokens.shape[0], jnp.int32), attend)
    next_tokens = sample(logits, jax.random.fold_in(rng, step_index), sampling)
    return jax.tree.leaves(nnx.state(model, nnx.Cache)), next_tokens

  return step


def decode_steps(step, params, cache, tables, lengths, counts, previous, rng, step_index, *,
                 count: int):
  """`count` decode steps of run_continuous's `step` in one call: every live row
  (counts 1) adds its last sample, and lengths and the step index advance on the device.
  One dispatch then carries `count` steps: a step's launches cost the host about as much
  time as the GPU spends on it. Returns (cache, samples int32 [count, S], the last
  step's samples [S])."""
  tokens = jnp.zeros((counts.shape[0], 1), jnp.int32)

  def one(carry, _):
    cache, lengths, previous, step_index = carry
    cache, samples = step(params, cache, tables, lengths, tokens, counts, previous,
                          counts > 0, rng, step_index)
    return (cache, lengths + counts, samples, step_index + 1), samples

  (cache, _, last, _), samples = jax.lax.scan(one, (cache, lengths, previous, step_index),
                                              None, length=count)
  return cache, samples, last


# ---- scheduling ------------------------------------------------------------------------------

class Progress:
  """A one-line progress bar on stderr: generated tokens, tokens/s, ms per decode step."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.enabled, self.last = total, enabled, 0.0

  def update(self, done: int, seconds: float, decode_ms: float | None, final=False):
    now = time.perf_counter()
    if not self.enabled or (not final and now - self.last < 0.2):
      return
    self.last = now
    width = 30
    filled = int(width * done / max(self.total, 1))
    step = f"{decode_ms:6.2f} ms/decode step" if decode_ms is not None else ""
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} tokens "
                     f"{done / max(seconds, 1e-9):8.1f} tok/s {step}")
    if final:
      sys.stderr.write("\n")
    sys.stderr.flush()


@dataclasses.dataclass
class Timing:
  seconds: float = 0.0
  steps: int = 0
  calls: int = 0  # host dispatches (a call may run several decode steps)
  decode_steps: int = 0
  decode_seconds: float = 0.0
  mixed_steps: int = 0  # steps that carry prefill chunks beside decoding sequences

  @property
  def decode_ms(self):
    return 1e3 * self.decode_seconds / self.decode_steps if self.decode_steps else None


class Pending:
  """Steps' samples and the (row, request) pairs they belong to, read `lag` steps at a
  time: the host dispatches steps back to back and never waits for the GPU between
  them, as serving engines schedule. Scheduling needs no sample's value: a sequence ends
  by its count of new tokens, and a decoding row's next input is the last step's own
  output (step_tokens). One read per `lag` steps also pays the device-to-host latency
  once (on the H200 a synchronous read per step cost more than the step itself)."""

  def __init__(self, lag: int):
    self.lag, self.held, self.steps = max(lag, 1), [], 0

  def hold(self, samples, owners, steps: int = 1):
    """samples: int32 [rows] on the device and owners the (row, request) pairs that
    sampled that step; or, with steps > 1, samples [steps, rows] and owners one such list
    per step."""
    self.held.append((samples, owners if steps > 1 else [owners]))
    self.steps += steps
    if self.steps >= self.lag:
      self.resolve()

  def resolve(self):
    values = jax.device_get([samples for samples, _ in self.held])  # one wait
    for block, (_, owners) in zip(values, self.held):
      for step_values, step_owners in zip(np.reshape(block, (len(owners), -1)), owners):
        for row, request in step_owners:
          request.generated.append(int(step_values[row]))
    self.held, self.steps = [], 0


def run_continuous(step, params, cache, paged: PagedCache | None, requests, *, slots: int,
                   prefill_chunk: int, rng, progress: Progress, lag: int,
                   steps_per_call: int) -> Timing:
  """Continuous batching over `slots`: admit, step (prefill chunks and decode tokens
  together), retire finished sequences (their pages return to the pool). While no slot
  prefills and no sequence ends within `steps_per_call` steps, one call runs that many
  decode steps (decode_steps). The samples' values arrive later (Pending)."""
  queue = list(requests)
  active: list[Request | None] = [None] * slots
  fed = np.zeros(slots, np.int64)  # prompt tokens of each slot already in the cache
  lengths = np.zeros(slots, np.int32)  # tokens in each slot's cache
  tables = paged.tables if paged else np.zeros((slots, 1), np.int32)  # the host edits it
  previous = jnp.zeros(slots, jnp.int32)  # the last step's samples, on the device
  counts = np.zeros(slots, np.int32)
  # Compiled ahead of the clock: a step per width (1, prefill_chunk), and the decode run.
  single = jax.jit(step, donate_argnums=(1,))
  compiled = {width: single.lower(params, cache, tables, lengths,
                                  np.zeros((slots, width), np.int32), counts, previous,
                                  np.zeros(slots, bool), rng, np.int32(0)).compile()
              for width in sorted({1, prefill_chunk})}
  if steps_per_call > 1:
    run = jax.jit(functools.partial(decode_steps, step, count=steps_per_call),
                  donate_argnums=(1,))
    run = run.lower(params, cache, tables, lengths, counts, previous, rng,
                    np.int32(0)).compile()
  timing, generated, pending = Timing(), 0, Pending(lag)
  start = time.perf_counter()
  while queue or any(r is not None for r in active):
    for slot in range(slots):  # admit waiting prompts into free slots
      if active[slot] is None and queue:
        if paged is not None and not paged.admit(slot, queue[0].total):
          if not any(r is not None for r in active):
            raise SystemExit(f"--num-pages is too small for a sequence of {queue[0].total} "
                             f"tokens ({paged.pages_for(queue[0].total)} pages)")
          break  # the pool is short: wait for a sequence to finish
        active[slot], fed[slot], lengths[slot] = queue.pop(0), 0, 0
    live = [(s, r) for s, r in enumerate(active) if r is not None]
    prefilling = {s for s, r in live if fed[s] < len(r.prompt)}
    width = prefill_chunk if prefilling else 1
    tokens = np.zeros((slots, width), np.int32)
    counts = np.zeros(slots, np.int32)
    use_previous = np.zeros(slots, bool)
    for slot, request in live:
      if slot in prefilling:
        chunk = request.prompt[fed[slot]:fed[slot] + width]
        tokens[slot, :len(chunk)], counts[slot] = chunk, len(chunk)
      else:
        counts[slot], use_previous[slot] = 1, True
    # A run of decode steps while no slot prefills and none ends before its last step
    # (admission waits for an end: a free slot with a waiting prompt is short of pages).
    steps = 1
    if (not prefilling and steps_per_call > 1 and
        min(r.max_new_tokens - r.produced for _, r in live) >= steps_per_call):
      steps = steps_per_call
    tick = time.perf_counter()
    # Copies: the host edits its tables and lengths while this step may still run.
    if steps == 1:
      cache, previous = compiled[width](params, cache, tables.copy(), lengths.copy(), tokens,
                                        counts, previous, use_previous, rng,
                                        np.int32(timing.steps))
      samples = previous
    else:
      cache, samples, previous = run(params, cache, tables.copy(), lengths.copy(), counts,
                                     previous, rng, np.int32(timing.steps))
    owners = []  # per step: the (slot, request) pairs that sampled a new token
    for _ in range(steps):
      lengths += counts
      sampled = []
      for slot, request in live:
        if active[slot] is not request:  # ended at an earlier step of this call
          continue
        fed[slot] += counts[slot] if slot in prefilling else 0
        if fed[slot] == len(request.prompt):  # the prompt is in: this step samples a token
          sampled.append((slot, request))
          request.produced += 1
          generated += 1
          if request.produced == request.max_new_tokens:
            active[slot] = None
            if paged is not None:
              paged.release(slot)
      owners.append(sampled)
    pending.hold(samples, owners if steps > 1 else owners[0], steps)
    seconds = time.perf_counter() - tick
    timing.steps += steps
    timing.calls += 1
    if not prefilling:
      timing.decode_steps += steps
      timing.decode_seconds += seconds
    elif len(prefilling) < len(live):
      timing.mixed_steps += 1
    progress.update(generated, time.perf_counter() - start, timing.decode_ms)
  tick = time.perf_counter()
  pending.resolve()  # the GPU's last held steps (decode steps) end here
  timing.decode_seconds += time.perf_counter() - tick
  timing.seconds = time.perf_counter() - start
  progress.update(generated, timing.seconds, timing.decode_ms, final=True)
  if paged is not None:
    paged.arrays = cache
  return timing


def run_lockstep(step, params, fresh_cache, requests, *, slots: int, rng,
                 progress: Progress, lag: int) -> Timing:
  """Flax's decode cache: waves of `slots` sequences, one token per row per step; a row
  feeds its prompt, then its samples, and idles once done; the samples' values arrive a
  step later (Pending), as in run_continuous."""
  timing, generated, pending = Timing(), 0, Pending(lag)
  previous = jnp.zeros(slots, jnp.int32)
  compiled = jax.jit(step, donate_argnums=(1,)).lower(
      params, fresh_cache(), np.int32(0), np.zeros((slots, 1), np.int32), previous,
      np.zeros(slots, bool), rng, np.int32(0)).compile()
  start = time.perf_counter()
  for first in range(0, len(requests), slots):
    wave = requests[first:first + slots]
    cache = fresh_cache()
    for t in range(max(r.total for r in wave) - 1):
      tokens = np.zeros((slots, 1), np.int32)
      use_previous = np.zeros(slots, bool)
      for row, request in enumerate(wave):
        if t < len(request.prompt):
          tokens[row, 0] = request.prompt[t]
        elif request.produced < request.max_new_tokens:
          use_previous[row] = True
      tick = time.perf_counter()
      cache, previous = compiled(params, cache, np.int32(t), tokens, previous, use_previous,
                                 rng, np.int32(timing.steps))
      sampled = []
      for row, request in enumerate(wave):
        if len(request.prompt) - 1 <= t and request.produced < request.max_new_tokens:
          sampled.append((row, request))
          request.produced += 1
          generated += 1
      pending.hold(previous, sampled)
      seconds = time.perf_counter() - tick
      timing.steps += 1
      timing.calls += 1
      timing.decode_steps += 1
      timing.decode_seconds += seconds
      progress.update(generated, time.perf_counter() - start, timing.decode_ms)
  tick = time.perf_counter()
  pending.resolve()  # the GPU's last held steps (decode steps) end here
  timing.decode_seconds += time.perf_counter() - tick
  timing.seconds = time.perf_counter() - start
  progress.update(generated, timing.seconds, timing.decode_ms, final=True)
  return timing


def greedy_by_recomputation(model, request: Request) -> list[int]:
  """The reference: each new token is the argmax of a full forward over all tokens so far
  (train_lm.LanguageModel's own call, no cache)."""
  context = model.config.seq_len
  # Causal: padding after the last token changes nothing before it (one compilation).
  forward = nnx.jit(lambda m, tokens, last: m(tokens)[0, last])
  tokens = list(request.prompt)
  for _ in range(request.max_new_tokens):
    padded = np.zeros((1, context), np.int32)
    padded[0, :len(tokens)] = tokens
    tokens.append(int(jnp.argmax(forward(model, padded, len(tokens) - 1))))
  return tokens[len(request.prompt):]


# ---- command line ----------------------------------------------------------------------------

def make_requests(args, max_context: int) -> list[Request]:
  """Prompts: windows of the standard library's source of random lengths in
  [--min-prompt, --max-prompt]; new tokens in [--min-new-tokens, --new-tokens]."""
  corpus = train_lm.load_corpus(int(args.data_mb * 2**20))
  rng = np.random.default_rng(args.seed)
  requests = []
  for _ in range(args.requests):
    length = int(rng.integers(args.min_prompt, args.max_prompt + 1))
    new = int(rng.integers(args.min_new_tokens or args.new_tokens, args.new_tokens + 1))
    start = int(rng.integers(0, len(corpus) - length))
    requests.append(Request(corpus[start:start + length].astype(np.int32), new))
  longest = max(r.total for r in requests)
  if longest > max_context:
    raise SystemExit(f"a prompt and its new tokens ({longest}) exceed the model's context "
                     f"({max_context}): lower --max-prompt / --new-tokens or raise --max-context")
  return requests


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--attention", choices=ATTENTIONS, default="flash")
  p.add_argument("--cache", choices=CACHES, default="paged",
                 help="with --attention flash (--attention flax uses Flax's decode cache)")
  p.add_argument("--checkpoint", default=None, help="a directory written by train_lm.py --save")
  p.add_argument("--implementation", default=None,
                 help=f"flash_jax implementation, one of {flash_jax.implementation_names()}")
  p.add_argument("--requests", type=int, default=8, help="prompts to generate for")
  p.add_argument("--slots", type=int, default=4, help="sequences decoded at once (batch)")
  p.add_argument("--min-prompt", type=int, default=16)
  p.add_argument("--max-prompt", type=int, default=96)
  p.add_argument("--new-tokens", type=int, default=48, help="most new tokens per prompt")
  p.add_argument("--min-new-tokens", type=int, default=16,
                 help="fewest new tokens per prompt (default: --new-tokens)")
  p.add_argument("--prefill-chunk", type=int, default=32, help="prompt tokens per step and slot")
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--num-pages", type=int, default=None,
                 help="page pool size (default: enough for the --slots longest requests)")
  p.add_argument("--read-every", type=int, default=16,
                 help="steps whose samples the host reads at once (see Pending)")
  p.add_argument("--steps-per-call", type=int, default=8,
                 help="decode steps one call may run (flash caches; see decode_steps)")
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=None)
  # The model (ignored with --checkpoint, which stores its own).
  p.add_argument("--max-context", type=int, default=256, help="positions the model embeds")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--d-model", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--mlp-ratio", type=int, default=4)
  p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                 help="default: float32 on CPU, bfloat16 elsewhere")
  p.add_argument("--data-mb", type=float, default=1.0, help="MiB of stdlib source for prompts")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--show", type=int, default=0, help="print this many generations")
  p.add_argument("--check", action="store_true",
                 help="compare greedy tokens with full-forward recomputation")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if args.min_new_tokens is not None and args.min_new_tokens > args.new_tokens:
    args.min_new_tokens = args.new_tokens
  if args.check and args.temperature > 0:
    p.error("--check compares greedy tokens: use --temperature 0")
  if not 1 <= args.min_prompt <= args.max_prompt:
    p.error("need 1 <= --min-prompt <= --max-prompt")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  shape = dict(seq_len=args.max_context, d_model=args.d_model, layers=args.layers,
               heads=args.heads, kv_heads=args.kv_heads, mlp_ratio=args.mlp_ratio)
  if args.checkpoint is not None:
    shape = read_checkpoint_config(args.checkpoint)
  config = train_lm.ModelConfig(**shape, attention=args.attention, dtype=dtype,
                                implementation=args.implementation, remat=False)
  model = load_model(config, args.checkpoint, args.seed)
  requests = make_requests(args, config.seq_len)
  sampling = Sampling(args.temperature, args.top_k)
  cache_kind = "flax" if args.attention == "flax" else args.cache
  rng = jax.random.key(args.seed)
  progress = Progress(sum(r.max_new_tokens for r in requests), not args.no_progress)

  if cache_kind != "paged":
    init_module_caches(model, args.slots, config.seq_len, dtype, ragged=cache_kind != "flax")
  graphdef, params, params_def, cache, cache_def = step_operands(model, dtype)
  if cache_kind == "paged":
    page_size = args.page_size
    longest = sorted((-(-r.total // page_size) for r in requests), reverse=True)
    num_pages = args.num_pages or sum(longest[:args.slots])
    paged = PagedCache(config, args.slots, num_pages, page_size, dtype)
    step = make_paged_step(graphdef, params_def, sampling, config.seq_len,
                           args.implementation)
    timing = run_continuous(step, params, paged.arrays, paged, requests, slots=args.slots,
                            prefill_chunk=args.prefill_chunk, rng=rng, progress=progress,
                            lag=args.read_every, steps_per_call=args.steps_per_call)
    cache_bytes = paged.bytes
  elif cache_kind == "contiguous":
    cache_bytes = sum(x.nbytes for x in cache)
    step = make_contiguous_step(graphdef, params_def, cache_def, sampling, config.seq_len)
    timing = run_continuous(step, params, cache, None, requests, slots=args.slots,
                            prefill_chunk=args.prefill_chunk, rng=rng, progress=progress,
                            lag=args.read_every, steps_per_call=args.steps_per_call)
  else:
    cache_bytes = sum(x.nbytes for x in cache)
    fresh_cache = lambda: [jnp.zeros_like(x) for x in cache]
    step = make_flax_step(graphdef, params_def, cache_def, sampling, config.seq_len)
    timing = run_lockstep(step, params, fresh_cache, requests, slots=args.slots, rng=rng,
                          progress=progress, lag=args.read_every)

  new_tokens = sum(len(r.generated) for r in requests)
  result = dict(attention=args.attention, cache=cache_kind, dtype=dtype,
                device=jax.devices()[0].device_kind, requests=len(requests), slots=args.slots,
                prompt_tokens=sum(len(r.prompt) for r in requests), new_tokens=new_tokens,
                steps=timing.steps, calls=timing.calls, mixed_steps=timing.mixed_steps,
                seconds=round(timing.seconds, 3),
                tokens_per_s=round(new_tokens / timing.seconds, 1),
                decode_step_ms=round(timing.decode_ms, 3) if timing.decode_ms else None,
                cache_mib=round(cache_bytes / 2**20, 2))
  if args.check:
    result["check"] = all(r.generated == greedy_by_recomputation(model, r) for r in requests)
  for request in requests[:args.show]:
    text = lambda tokens: bytes(np.asarray(tokens, np.uint8)).decode("utf-8", "replace")
    print(f"--- prompt ({len(request.prompt)} tokens) ---\n{text(request.prompt)}\n"
          f"--- generated ({len(request.generated)} tokens) ---\n{text(request.generated)}")
  print("SUMMARY " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
  result["generated"] = [list(r.generated) for r in requests]
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
