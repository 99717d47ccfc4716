"""Batched on-device sampling: penalties, bans, temperature, min-p, top-k, top-p, logprobs.

`sample` runs in the step's sampler program on the logits of each sequence's last query token.
Every array is fixed-shape (N = sequence bucket, V = vocab). Cheap stages (bans, temperature,
min-p) run on every row and are switched per row by array data; the stages that cost a pass
over the vocabulary or more (penalties, the top-k/top-p filter, the top-K logprobs) are switched
by the static `SamplerFlags`, a small fixed set of sampler programs that the runner compiles at
startup (docs/architecture.md, Sampling: lax.cond would select them by data inside one program,
but on a GPU it makes the dispatching thread wait for the device).

Order of operations (vLLM semantics), all in float32:
  1. penalties (repetition on prompt+output tokens, then frequency and presence on output tokens);
  2. banned tokens -> -inf (used for `min_tokens`: EOS / stop ids while too short);
  3. greedy rows (temperature < 1e-5) take the argmax of these logits;
  4. other rows: divide by temperature, min-p, top-k, top-p, then Gumbel-max sampling with a
     per-row key fold_in(fold_in(key(seed), sample_index), step). A row's token depends only on
     (seed, sample_index, step, its own logits row): never on its position or on other rows.
     Rows with 0 < top_k <= SORT_FREE_TOP_K are filtered from their SORT_FREE_TOP_K largest
     logits in every program, so whether the batch sorted the vocabulary changes no row. On
     GPUs the other rows' thresholds come from radix searches instead of a sort
     (BISECT_THRESHOLDS).
Returned logprobs are log-softmax of the RAW logits (vLLM's `raw_logprobs`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Temperatures below this are treated as greedy (dividing by them would overflow).
GREEDY_TEMPERATURE_EPS = 1e-5

# Rows with 0 < top_k <= this need only their this-many largest logits (`largest_values`), not
# a sort of the vocabulary: on CPU one row's sort of a 49k vocabulary took 9.4 ms, its top 128
# 0.09 ms. Covers the usual top_k values (20, 40, 50, 100).
SORT_FREE_TOP_K = 128

# Whether rows beyond SORT_FREE_TOP_K (top_p alone, a larger top_k) get their thresholds from
# radix searches rather than a sort, by JAX platform. On an H200 a sort of [1024, 128k] logits
# takes 8.3 ms and a search a few passes over them; on a CPU the passes would cost more than
# the sort (docs/perf.md).
BISECT_THRESHOLDS = {"cpu": False}
DEFAULT_BISECT_THRESHOLDS = True

# `largest_values` reads the vocabulary in blocks of this many logits and keeps the k blocks
# with the largest maxima: every one of a row's k largest values lies in them, so the exact
# top k is taken from k x BLOCK candidates rather than the whole row. (XLA's GPU TopK kernel
# takes k <= 16 and sorts the row for a larger k: top 20 of [1024, 128k] logits took 8.6 ms.)
CANDIDATE_BLOCK = 32

# "nucleus_few" programs search the thresholds of at most 1 / this of their rows, gathered
# (`few_searched_rows`): a search costs a few passes over each row it covers, and a batch where
# a few requests ask for top_p alone should not pay for the whole batch.
FEW_SEARCHED_SHARE = 4

# Bits of the 32-bit search key settled per pass over the vocabulary by `_largest_key_where`:
# each pass makes 2**bits - 1 fused counts or sums.
RADIX_BITS = 2

_NEG_INF = float("-inf")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    """Per-sequence sampling parameters for one step, built on the host by the model runner.

    N is the sequence bucket; padding rows may hold any value (e.g. temperature 0).

    temperature:        f32[N]      0 (or < 1e-5) -> greedy.
    top_k:              i32[N]      <= 0 or >= V -> off.
    top_p:              f32[N]      >= 1.0 -> off; otherwise in (0, 1].
    min_p:              f32[N]      0.0 -> off.
    presence_penalty:   f32[N]      subtracted once from each token present in the output; 0 off.
    frequency_penalty:  f32[N]      subtracted per occurrence of a token in the output; 0 off.
    repetition_penalty: f32[N]      for tokens in prompt or output: positive logits divided by it,
                                    non-positive logits multiplied by it; 1.0 off.
    seeds:              u32|i32[N]  per-request seed (an i32 is reinterpreted as its u32 bits).
    sample_index:       i32[N]      child index of an n > 1 request (0 otherwise).
    step:               i32[N]      number of tokens this sequence has generated so far.
    prompt_lens:        i32[N]      prompt length: where the output starts in the row's token
                                    history (read by the penalties only).
    banned_token_ids:   i32[N, Kb]  -1 padded; set to -inf this step (a fixed width Kb).
    search_rows:        i32[S]      the rows whose thresholds a "nucleus_few" program searches,
                                    padded with N (S = few_searched_rows(N)).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    repetition_penalty: jax.Array
    seeds: jax.Array
    sample_index: jax.Array
    step: jax.Array
    prompt_lens: jax.Array
    banned_token_ids: jax.Array
    search_rows: jax.Array


def few_searched_rows(num_rows: int) -> int:
    """S, the number of rows a "nucleus_few" sampler program of N = num_rows rows searches."""
    return max(1, num_rows // FEW_SEARCHED_SHARE)


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Static (hashable) switches of the costly stages; each combination is one sampler program.

    use_top_k_top_p:  some row has top_k or top_p on.
    threshold_method: with use_top_k_top_p, how `apply_top_k_top_p` finds the thresholds of
                      rows other than those with 0 < top_k <= SORT_FREE_TOP_K (which take
                      theirs from their largest logits in every method): "top_k_prefix" when
                      there are none; on GPUs (BISECT_THRESHOLDS) "nucleus_few" when at most
                      few_searched_rows(N) rows have top_p alone (one radix search over those
                      rows, `SamplingMetadata.search_rows`), "nucleus" when more have (over
                      every row), "bisect" for any row (two searches); else "sort".
    use_penalties:    some row has a presence/frequency/repetition penalty on.
    num_logprobs:     K, the number of top logprobs returned per row (0 -> none). The runner
                      returns K = EngineConfig.max_logprobs in every step, whatever the rows
                      ask for, and the host keeps each request's own count: taken from block
                      candidates they cost 0.13 ms a step for 256 rows on an H200, against a
                      second copy of every sampler program (docs/perf.md).
    """

    use_top_k_top_p: bool = False
    threshold_method: str = "sort"
    use_penalties: bool = False
    num_logprobs: int = 0

    @classmethod
    def all_variants(cls, num_logprobs: int, bisect_thresholds: bool) -> list["SamplerFlags"]:
        """Every combination the runner can ask for, with K = num_logprobs top logprobs: the
        filter modes (off, sort-free top-k, sort; on GPUs off, sort-free top-k, nucleus of a
        few rows, nucleus, bisection) x penalties on/off, except the few rows' nucleus with
        penalties, which "nucleus" serves (6, or 9 on GPUs). The first is plain sampling."""
        filters = [(False, "sort"), (True, "top_k_prefix")]
        filters += ([(True, "nucleus_few"), (True, "nucleus"), (True, "bisect")]
                    if bisect_thresholds else [(True, "sort")])
        return [cls(top_k_top_p, method, penalties, num_logprobs)
                for penalties in (False, True)
                for top_k_top_p, method in filters
                if not (penalties and method == "nucleus_few")]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of one chosen token per row (sampled, or the next prompt token), with
    its rank and the row's K most likely tokens. M rows, K = the number of top logprobs asked for.

    logprobs:     f32[M]     log-softmax of the raw logits at the chosen token.
    ranks:        i32[M]     1 + the number of tokens strictly more likely than the chosen one
                             (vLLM's rank: 1 = most likely), whether or not it is in the top K.
    top_ids:      i32[M, K]  the K most likely tokens, descending.
    top_logprobs: f32[M, K]  their log-probabilities.
    """

    logprobs: jax.Array
    ranks: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """What one step sends back to the host: token_ids i32[N], the sampled token of each row,
    and its logprobs (TokenLogprobs over the raw logits, K = flags.num_logprobs)."""

    token_ids: jax.Array
    logprobs: TokenLogprobs


def compute_logprobs(logits: jax.Array, target_ids: jax.Array, num_logprobs: int) -> TokenLogprobs:
    """Log-softmax of `logits` at `target_ids`, their ranks, and the top-`num_logprobs` entries
    of each row. Used for sampled tokens and for prompt logprobs alike.

    Args:
      logits:       f32/bf16[M, V] raw logits.
      target_ids:   i32[M] token per row (out-of-range ids are clamped; mask such rows yourself).
      num_logprobs: static K >= 0.
    """
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(
        logprobs, target_ids.astype(jnp.int32)[:, None], axis=-1, mode="clip"
    )[:, 0]
    ranks = 1 + jnp.sum(logprobs > target[:, None], axis=-1, dtype=jnp.int32)
    m = logits.shape[0]
    if num_logprobs > 0:
        top_vals, top_ids = largest_values(logprobs, num_logprobs)
    else:
        top_vals = jnp.zeros((m, 0), jnp.float32)
        top_ids = jnp.zeros((m, 0), jnp.int32)
    return TokenLogprobs(logprobs=target, ranks=ranks, top_ids=top_ids, top_logprobs=top_vals)


def largest_values(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(x, k)` of f32[M, V] without sorting the rows: (values f32[M, k], ids i32[M, k]),
    descending, ties in index order.

    Every one of a row's k largest values lies in the k blocks (of CANDIDATE_BLOCK positions)
    with the largest maxima: a block left out has k blocks whose maxima are at least its own, so k
    values at least as large. The top k is taken from those k x block candidates, gathered in
    vocabulary order so ties resolve as lax.top_k's do (a tie at the cut that leaves a block
    out means k blocks tie at their maxima, and the lower-indexed ones are kept). Rows too short
    for that to pay use lax.top_k itself.
    """
    m, v = x.shape
    block = CANDIDATE_BLOCK
    num_blocks = -(-v // block)
    if num_blocks <= 2 * k:
        values, ids = jax.lax.top_k(x, k)
        return values, ids.astype(jnp.int32)
    padded = jnp.pad(x, ((0, 0), (0, num_blocks * block - v)), constant_values=_NEG_INF)
    blocks = padded.reshape(m, num_blocks, block)
    _, kept = jax.lax.top_k(jnp.max(blocks, axis=-1), k)
    kept = jnp.sort(kept.astype(jnp.int32), axis=-1)  # vocabulary order
    candidates = jnp.take_along_axis(blocks, kept[:, :, None], axis=1).reshape(m, k * block)
    values, position = jax.lax.top_k(candidates, k)
    ids = kept[jnp.arange(m)[:, None], position // block] * block + position % block
    return values, ids


def _row_index(ids: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """Scatter indices (rows, cols) for a -1 padded id list i32[N, L]; padding -> column V."""
    n = ids.shape[0]
    ids = ids.astype(jnp.int32)
    cols = jnp.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)
    rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], ids.shape)
    return rows, cols


def token_counts(ids: jax.Array, vocab_size: int) -> jax.Array:
    """Occurrences of each token in each row of a -1 padded id list.

    Args:
      ids: i32[N, L], -1 padded (any id outside [0, V) is ignored).
    Returns:
      i32[N, V] counts.
    """
    n = ids.shape[0]
    counts = jnp.zeros((n, vocab_size), jnp.int32)
    if ids.shape[1] == 0:
        return counts
    rows, cols = _row_index(ids, vocab_size)
    return counts.at[rows, cols].add(1, mode="drop")


def apply_penalties(logits: jax.Array, token_ids: jax.Array, metadata: SamplingMetadata) -> jax.Array:
    """Repetition (prompt+output), then frequency and presence (output) penalties.

    Args:
      logits:    f32[N, V].
      token_ids: i32[N, L] each row's tokens so far, prompt then output, -1 past its length;
                 its output starts at metadata.prompt_lens.
    Returns:
      f32[N, V] penalized logits.
    """
    _, v = logits.shape
    position = jnp.arange(token_ids.shape[1], dtype=jnp.int32)[None, :]
    is_output = position >= metadata.prompt_lens.astype(jnp.int32)[:, None]
    out_counts = token_counts(jnp.where(is_output, token_ids, -1), v)
    seen = token_counts(token_ids, v) > 0
    rep = metadata.repetition_penalty.astype(jnp.float32)[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    freq = metadata.frequency_penalty.astype(jnp.float32)[:, None]
    pres = metadata.presence_penalty.astype(jnp.float32)[:, None]
    logits = logits - freq * out_counts.astype(jnp.float32)
    logits = logits - pres * (out_counts > 0).astype(jnp.float32)
    return logits


def apply_banned_tokens(logits: jax.Array, banned_token_ids: jax.Array) -> jax.Array:
    """Set logits[i, banned_token_ids[i, j]] = -inf for every non-padding entry (a scatter of
    N x Kb entries: cheap enough for every program to apply it by data).

    Args:
      logits: f32[N, V]; banned_token_ids: i32[N, Kb], -1 padded.
    """
    if banned_token_ids.shape[1] == 0:
        return logits
    rows, cols = _row_index(banned_token_ids, logits.shape[1])
    return logits.at[rows, cols].set(_NEG_INF, mode="drop")


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drop tokens whose probability is below min_p * (max probability) of their row.

    Done in log space: keep where logit >= max_logit + log(min_p); rows with min_p = 0 are
    returned unchanged (one fused pass over [N, V], so every program applies it by data).
    Args:
      logits: f32[N, V] (already temperature-scaled); min_p: f32[N].
    """
    min_p = min_p.astype(jnp.float32)[:, None]
    max_logit = jnp.max(logits, axis=-1, keepdims=True)
    keep = (min_p <= 0.0) | (logits >= max_logit + jnp.log(min_p))
    return jnp.where(keep, logits, _NEG_INF)


def _top_k_top_p_threshold(sorted_desc: jax.Array, k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The lowest kept logit of each row, from a descending prefix f32[N, W] of its logits that
    holds at least its top-k (k: i32[N] in [1, V]; V for off)."""
    width = sorted_desc.shape[1]
    pos = jnp.arange(width, dtype=jnp.int32)[None, :]
    in_k = pos < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, sorted_desc, _NEG_INF), axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each position
    p = top_p.astype(jnp.float32)[:, None]
    keep = in_k & ((cum_before < p) | (pos == 0) | (p >= 1.0))
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, dtype=jnp.int32), 1)
    return jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)[:, 0]


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array,
                      method: str = "sort", search_rows: jax.Array | None = None) -> jax.Array:
    """Top-k, then top-p (nucleus) over the renormalized top-k.

    Top-p keeps the smallest prefix of the sorted tokens whose cumulative probability reaches
    top_p (the most likely token is always kept). Both filters become a per-row logit threshold,
    so tokens tied with the last kept one are kept as well. Rows with 0 < top_k <=
    SORT_FREE_TOP_K take theirs from their SORT_FREE_TOP_K largest logits (`largest_values`)
    whatever the method; `method` finds the other rows':
      "sort":         from a descending sort of [N, V] (any row);
      "top_k_prefix": none (every filtered row must have such a top_k; unfiltered rows are
                      kept whole);
      "nucleus":      top_p alone (top_k off), by one radix search over the logits;
      "nucleus_few":  the same for the rows `search_rows` only (others must need no search);
      "bisect":       any row, by radix searches (`_searched_threshold`), no sort.
    All give the same result, up to float rounding of top-p's cumulative sums.

    Args:
      logits: f32[N, V]; top_k: i32[N] (<= 0 or >= V off); top_p: f32[N] (>= 1 off);
      search_rows: i32[S] for "nucleus_few", padded with N.
    Returns:
      f32[N, V] with dropped tokens at -inf.
    """
    _, v = logits.shape
    k = top_k.astype(jnp.int32)
    k = jnp.where((k <= 0) | (k >= v), v, k)
    width = min(SORT_FREE_TOP_K, v)
    if method == "sort":
        sorted_desc = jnp.sort(logits, axis=-1, descending=True)
        largest, beyond = sorted_desc[:, :width], _top_k_top_p_threshold(sorted_desc, k, top_p)
    else:
        largest = largest_values(logits, width)[0]
        if method == "top_k_prefix":
            beyond = jnp.full(k.shape, _NEG_INF, jnp.float32)
        elif method == "nucleus_few":
            searched = _searched_threshold(
                jnp.take(logits, search_rows, axis=0, mode="fill", fill_value=0.0), None,
                jnp.take(top_p, search_rows, mode="fill", fill_value=1.0), find_top_k=False)
            beyond = jnp.full(k.shape, _NEG_INF, jnp.float32).at[search_rows].set(
                searched, mode="drop")
        else:
            beyond = _searched_threshold(logits, k, top_p, find_top_k=method == "bisect")
    threshold = jnp.where(k <= width, _top_k_top_p_threshold(largest, k, top_p), beyond)
    return jnp.where(logits >= threshold[:, None], logits, _NEG_INF)


# A float's u32 search key sorts as the float does: a negative float's bits reversed, a
# positive one's with the top bit set (above every negative one).
_NEG_INF_KEY = 0x007FFFFF  # the key of -inf; keys below it are negative NaNs
_POS_INF_KEY = 0xFF800000  # the key of +inf; keys above it are positive NaNs


def _key_values(keys: jax.Array) -> jax.Array:
    """f32 values of u32 search keys (above), NaN keys as the infinity at
    their end, so a predicate that compares logits with these values is monotone in the key."""
    bits = jnp.where((keys >> 31) == 1, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    values = jax.lax.bitcast_convert_type(bits, jnp.float32)
    values = jnp.where(keys < jnp.uint32(_NEG_INF_KEY), _NEG_INF, values)
    return jnp.where(keys > jnp.uint32(_POS_INF_KEY), jnp.inf, values)


def _largest_key_where(holds, rows: int, bits: int = RADIX_BITS) -> jax.Array:
    """f32[rows]: per row, the value of the largest key K with holds(value(K)) (bool[rows]), for
    a predicate that holds from -inf up to some value and nowhere above it. `bits` of the key
    a pass, from the top: each pass's 2**bits - 1 tests read the same data, which XLA fuses
    into one read of it."""
    found = jnp.zeros(rows, jnp.uint32)
    shift = 32
    while shift > 0:
        step = min(bits, shift)
        shift -= step
        best = found
        for digit in range(1, 2 ** step):  # the predicate holds for a prefix of the digits
            candidate = found | jnp.uint32(digit << shift)
            best = jnp.where(holds(_key_values(candidate)), candidate, best)
        found = best
    return _key_values(found)


def _searched_threshold(logits: jax.Array, k: jax.Array | None, top_p: jax.Array,
                        find_top_k: bool) -> jax.Array:
    """Top-k then top-p thresholds f32[N] without a sort. The top-k threshold is the largest
    value with at least k logits at or above it (the k-th largest); the top-p threshold the
    largest value whose tokens (within the top-k) hold at least top_p of the top-k's
    probability mass, which is the last token the sorted prefix keeps. Without `find_top_k`
    every row must have top_k off (k = V, and may be None). k: i32[N] in [1, V]."""
    rows = logits.shape[0]
    largest = jnp.max(logits, axis=-1)
    weights = jnp.exp(logits - largest[:, None])  # recomputed inside each pass by XLA's fusion
    if find_top_k:
        k_cut = _largest_key_where(
            lambda t: jnp.sum(logits >= t[:, None], axis=-1, dtype=jnp.int32) >= k, rows)
        # Top-p renormalizes over exactly k tokens, as the sorted prefix does: those above the
        # cut, and as many of the tokens tied at the cut as make up k.
        above = logits > k_cut[:, None]
        num_at_cut = k - jnp.sum(above, axis=-1, dtype=jnp.int32)
        mass = (jnp.sum(jnp.where(above, weights, 0.0), axis=-1)
                + num_at_cut * jnp.exp(k_cut - largest))
    else:
        k_cut = jnp.full((rows,), _NEG_INF, jnp.float32)
        mass = jnp.sum(weights, axis=-1)
    needed = top_p.astype(jnp.float32) * mass
    p_cut = _largest_key_where(
        lambda t: (t <= k_cut) | (jnp.sum(jnp.where(logits >= t[:, None], weights, 0.0),
                                          axis=-1) >= needed), rows)
    return jnp.where(top_p < 1.0, p_cut, k_cut)


def argmax_rows(x: jax.Array) -> jax.Array:
    """i32[N]: the index of the first largest entry of each row of f32[N, V], a NaN counting as
    largest (numpy's argmax).

    A max and a min over the matching indices rather than jnp.argmax: on CPU, XLA runs argmax's
    (value, index) reduction as scalar code, 3x as long over a 49k vocabulary as these two
    reductions, which vectorize; on GPUs jnp.argmax picks the last NaN, not the first.
    """
    largest = jnp.max(x, axis=-1, keepdims=True)
    hits = (x == largest) | jnp.isnan(x)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hits, index, x.shape[-1]), axis=-1)


def row_keys(seeds: jax.Array, sample_index: jax.Array, step: jax.Array) -> jax.Array:
    """Typed PRNG keys key[N]: fold_in(fold_in(key(seed), sample_index), step) per row."""

    def one(seed, idx, st):
        key = jax.random.key(seed)
        return jax.random.fold_in(jax.random.fold_in(key, idx), st)

    if seeds.dtype == jnp.int32:  # same bits -> same key, whichever dtype the runner used
        seeds = jax.lax.bitcast_convert_type(seeds, jnp.uint32)
    return jax.vmap(one)(
        seeds.astype(jnp.uint32), sample_index.astype(jnp.int32), step.astype(jnp.int32)
    )


def gumbel_noise(keys: jax.Array, vocab_size: int) -> jax.Array:
    """f32[N, V] standard Gumbel noise, row i drawn from keys[i] alone (batch-independent)."""
    return jax.vmap(lambda k: jax.random.gumbel(k, (vocab_size,), jnp.float32))(keys)


def sample(logits: jax.Array, metadata: SamplingMetadata, flags: SamplerFlags,
           token_ids: jax.Array | None = None) -> SamplerOutput:
    """Sample one token per row, on device, with no host synchronization.

    Args:
      logits:    f32/bf16[N, V] raw logits of each sequence's last query token.
      metadata:  per-row parameters (see SamplingMetadata).
      flags:     static switches; jit with `static_argnames="flags"` (or close over it).
      token_ids: i32[N, L] each row's tokens so far (see apply_penalties); read only when
                 flags.use_penalties.
    Returns:
      SamplerOutput: token_ids i32[N] and their logprobs (of the raw logits) with K top entries.
    """
    raw = logits.astype(jnp.float32)
    _, v = raw.shape
    x = raw
    if flags.use_penalties:
        x = apply_penalties(x, token_ids, metadata)
    x = apply_banned_tokens(x, metadata.banned_token_ids)

    # Greedy rows (temperature 0) take the argmax of these logits, the others of filtered,
    # temperature-scaled logits plus Gumbel noise: one program and one argmax serve greedy and
    # sampled rows alike, so an all-greedy batch needs no program of its own.
    temperature = metadata.temperature.astype(jnp.float32)
    is_greedy = temperature < GREEDY_TEMPERATURE_EPS
    scaled = x / jnp.where(is_greedy, 1.0, temperature)[:, None]
    scaled = apply_min_p(scaled, metadata.min_p)
    if flags.use_top_k_top_p:
        scaled = apply_top_k_top_p(scaled, metadata.top_k, metadata.top_p, flags.threshold_method,
                                   metadata.search_rows)
    keys = row_keys(metadata.seeds, metadata.sample_index, metadata.step)
    perturbed = scaled + gumbel_noise(keys, v)
    token_ids = argmax_rows(jnp.where(is_greedy[:, None], x, perturbed))

    return SamplerOutput(token_ids=token_ids,
                         logprobs=compute_logprobs(raw, token_ids, flags.num_logprobs))
