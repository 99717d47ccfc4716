"""The runner's persistent batch, without a device: after random joins, removals, preemptions,
resets, steps and fetches, `ModelRunner.prepare` lays out exactly the step that a direct
construction from whole sequences gives, and the runner's token lists match the host's."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from pjllm.config import ModelConfig
from pjllm.kernels.ops import AttentionBackend
from pjllm.models.loader import build_model
from pjllm.runner.model_runner import ModelRunner, StepHandle
from pjllm.runner.sampler import SORT_FREE_TOP_K, SamplerOutput
from pjllm.sampling_params import SamplingParams
from pjllm.scheduler_output import NewSequence, SchedulerOutput

VOCAB, EOS, PAGE, MAX_LEN, MAX_SEQS, BUDGET = 256, 2, 4, 40, 6, 24
NUM_PAGES = MAX_SEQS * MAX_LEN // PAGE
TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 64, "eos_token_id": EOS}
PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_k=20, min_tokens=3, stop_token_ids=[5, 6], seed=4),
    SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=0.5, logprobs=2),
    SamplingParams(temperature=0.9, top_k=VOCAB, repetition_penalty=1.2, prompt_logprobs=1),
    SamplingParams(temperature=0.5, top_k=SORT_FREE_TOP_K + 1, min_p=0.1, n=2, min_tokens=1),
    SamplingParams(temperature=0.8, top_p=0.95),
]


@pytest.fixture(scope="module")
def model():
    config = ModelConfig.from_hf_config(TINY)
    return config, *build_model(config, jnp.float32, "dummy", "", 0)


@dataclasses.dataclass(eq=False)
class Seq:
    """The host's view of one sequence; None marks a token sampled and not fetched yet."""

    seq_id: int
    params: SamplingParams
    sample_index: int
    tokens: list
    prompt_len: int
    computed: int = 0
    pages: list = dataclasses.field(default_factory=list)
    pages_sent: int | None = None  # None: the runner does not hold it
    sampled_in: int | None = None  # the step that sampled the newest token, and its row there
    sampled_row: int = 0

    def new_sequence(self) -> NewSequence:
        assert None not in self.tokens
        self.sampled_in = None  # a new add: the runner knows nothing it sampled before
        return NewSequence(self.seq_id, list(self.tokens), self.prompt_len, self.computed,
                           self.params, 7 + self.seq_id, self.sample_index,
                           (EOS, *self.params.stop_token_ids), list(self.pages))


def reference_step(runner: ModelRunner, seqs: list[Seq], counts: list[int], step_id: int):
    """The step's arrays, built sequence by sequence as plainly as possible."""
    num_tokens = sum(counts)
    T = min(size for size in runner.token_buckets if size >= num_tokens)
    N = runner.seq_bucket(T)
    token_ids, last_rows = np.zeros(T, np.int32), np.full(T, -1, np.int32)
    positions, slots, targets = np.zeros(T, np.int32), np.full(T, -1, np.int32), np.full(T, -1, np.int32)
    query_start_loc, seq_lens = np.full(N + 1, num_tokens, np.int32), np.zeros(N, np.int32)
    block_tables = np.zeros((N, runner.max_pages_per_seq), np.int32)
    logits_indices = np.zeros(N, np.int32)
    cursor = 0
    for i, (seq, count) in enumerate(zip(seqs, counts)):
        query_start_loc[i] = cursor
        for position in range(seq.computed, seq.computed + count):
            positions[cursor] = position
            slots[cursor] = seq.pages[position // PAGE] * PAGE + position % PAGE
            if position == len(seq.tokens) - 1 and seq.sampled_in == step_id - 1:
                last_rows[cursor] = seq.sampled_row
            else:
                assert seq.tokens[position] is not None
                token_ids[cursor] = seq.tokens[position]
            if seq.params.prompt_logprobs is not None and position < seq.prompt_len - 1:
                targets[cursor] = seq.tokens[position + 1]
            cursor += 1
        seq_lens[i] = seq.computed + count
        block_tables[i, :len(seq.pages)] = seq.pages
        logits_indices[i] = cursor - 1

    def column(values, dtype, fill):
        return np.array(values + [fill] * (N - len(values)), dtype)

    params = [seq.params for seq in seqs]
    top_k = [p.top_k if p.top_k < VOCAB else 0 for p in params]
    steps = [len(seq.tokens) - seq.prompt_len for seq in seqs]
    banned = np.full((N, 32), -1, np.int32)
    for i, (seq, step) in enumerate(zip(seqs, steps)):
        if step < seq.params.min_tokens:
            ids = [EOS, *seq.params.stop_token_ids]
            banned[i, :len(ids)] = ids
    filtered = [k for p, k in zip(params, top_k) if not p.is_greedy and (k > 0 or p.top_p < 1)]
    searched = [i for i, (p, k) in enumerate(zip(params, top_k))
                if not p.is_greedy and (k > 0 or p.top_p < 1) and not 0 < k <= SORT_FREE_TOP_K]
    penalties = any(p.uses_penalties for p in params)
    few = max(1, N // 4)
    if not filtered:
        method = "sort"
    elif not searched:
        method = "top_k_prefix"
    elif not runner.bisect_thresholds:
        method = "sort"
    elif any(top_k[i] > 0 for i in searched):
        method = "bisect"
    else:
        method = "nucleus_few" if len(searched) <= few and not penalties else "nucleus"
    search_rows = np.full(few, N, np.int32)
    if method == "nucleus_few":
        search_rows[:len(searched)] = searched
    flags = dict(use_top_k_top_p=bool(filtered), threshold_method=method,
                 use_penalties=penalties, num_logprobs=runner.num_logprobs)
    sampling = dict(
        temperature=column([p.temperature for p in params], np.float32, 0),
        top_k=column(top_k, np.int32, 0), top_p=column([p.top_p for p in params], np.float32, 1),
        min_p=column([p.min_p for p in params], np.float32, 0),
        presence_penalty=column([p.presence_penalty for p in params], np.float32, 0),
        frequency_penalty=column([p.frequency_penalty for p in params], np.float32, 0),
        repetition_penalty=column([p.repetition_penalty for p in params], np.float32, 1),
        seeds=column([7 + seq.seq_id for seq in seqs], np.uint32, 0),
        sample_index=column([seq.sample_index for seq in seqs], np.int32, 0),
        step=column(steps, np.int32, 0), prompt_lens=column([s.prompt_len for s in seqs], np.int32, 0),
        banned_token_ids=banned, search_rows=search_rows)
    wants_prompt = any(seq.params.prompt_logprobs is not None and seq.computed < seq.prompt_len - 1
                       for seq in seqs)
    arrays = dict(token_ids=token_ids, last_token_rows=last_rows, positions=positions,
                  slot_mapping=slots, query_start_loc=query_start_loc, seq_lens=seq_lens,
                  block_tables=block_tables, logits_indices=logits_indices,
                  prompt_logprob_targets=targets, **sampling)
    return arrays, flags, wants_prompt


def _leaves(batch, device_table: np.ndarray) -> dict[str, np.ndarray]:
    """The step's arrays, with the block tables its programs read from the device's table."""
    fields = {**vars(batch), **vars(batch.attention), **vars(batch.sampling)}
    leaves = {name: value for name, value in fields.items() if isinstance(value, np.ndarray)}
    leaves["block_tables"] = device_table[leaves.pop("seq_rows")]
    return leaves


@pytest.mark.parametrize("seed", range(8))
def test_prepare_matches_a_direct_construction(model, seed):
    config, graphdef, state = model
    runner = ModelRunner(config, graphdef, state, num_pages=NUM_PAGES, page_size=PAGE,
                         max_model_len=MAX_LEN, max_num_seqs=MAX_SEQS, max_num_batched_tokens=BUDGET,
                         dtype=jnp.float32, attention=AttentionBackend("reference"), max_logprobs=4)
    runner.bisect_thresholds = seed % 2 == 1  # a GPU's sampler programs (none runs here)
    rng = np.random.default_rng(seed)
    free_pages = rng.permutation(NUM_PAGES).tolist()
    running: list[Seq] = []
    readmit: list[Seq] = []  # preempted, waiting for their tokens in flight to be fetched
    removed: list[int] = []
    in_flight: list[tuple[StepHandle, list[tuple[Seq, int, int]]]] = []
    reset, next_id, step_id = False, 0, 0
    # The device's block table, kept as the runner's writes say.
    device_table = np.zeros((MAX_SEQS + 1, runner.max_pages_per_seq), np.int32)

    def fetch():
        handle, sampled = in_flight.pop(0)
        tokens = rng.integers(3, VOCAB, MAX_SEQS).astype(np.int32)
        runner.fetch(dataclasses.replace(handle, sampled=SamplerOutput(tokens, None)))
        for seq, position, row in sampled:
            seq.tokens[position] = int(tokens[row])

    def release(seq):
        free_pages.extend(seq.pages)
        seq.pages = []
        if seq.pages_sent is not None:
            removed.append(seq.seq_id)
        seq.pages_sent = None
        running.remove(seq)

    for _ in range(80):
        # The engine fetches step k before it prepares step k + 2, sometimes before k + 1.
        while in_flight and (len(in_flight) > 1 or rng.random() < 0.4):
            fetch()
        if rng.random() < 0.04:  # a message was lost: the runner gets its whole batch again
            while in_flight:
                fetch()
            reset, removed = True, []
            for seq in running:
                seq.pages_sent = None
        for seq in list(running):
            draw = rng.random()
            if draw < 0.06 or len(seq.tokens) >= MAX_LEN - 1:
                release(seq)  # finished
            elif draw < 0.12:
                release(seq)  # preempted
                seq.computed = 0
                readmit.append(seq)
        while len(running) < MAX_SEQS and rng.random() < 0.5:
            ready = [seq for seq in readmit if None not in seq.tokens]
            if ready and rng.random() < 0.5:
                readmit.remove(ready[0])
                running.append(ready[0])
            else:
                prompt = rng.integers(3, VOCAB, rng.integers(1, 14)).tolist()
                params = PARAMS[rng.integers(len(PARAMS))]
                running.append(Seq(next_id, params, int(rng.integers(2)), prompt, len(prompt)))
                next_id += 1
        scheduled, counts, budget = [], [], BUDGET
        for seq in running:
            if budget and rng.random() < 0.85:
                count = min(len(seq.tokens) - seq.computed, budget, int(rng.integers(1, 12)))
                scheduled.append(seq)
                counts.append(count)
                budget -= count
        if not scheduled:
            continue
        new_seqs, new_pages = [], {}
        for seq, count in zip(scheduled, counts):
            needed = -(-(seq.computed + count) // PAGE) - len(seq.pages)
            seq.pages += [free_pages.pop() for _ in range(needed)]
            if seq.pages_sent is None:
                new_seqs.append(seq.new_sequence())
            elif seq.pages_sent < len(seq.pages):
                new_pages[seq.seq_id] = seq.pages[seq.pages_sent:]
            seq.pages_sent = len(seq.pages)
        message = SchedulerOutput(reset, removed, new_seqs, new_pages,
                                  [seq.seq_id for seq in scheduled], counts)
        reset, removed = False, []

        expected, flags, wants_prompt = reference_step(runner, scheduled, counts, step_id)
        batch, variant = runner.prepare(message)
        indices, page_ids = runner._table_writes
        assert len(np.unique(indices)) == len(indices)  # one scatter: no index twice
        device_table.reshape(-1)[indices] = page_ids
        np.testing.assert_array_equal(device_table, runner.input_batch.block_tables)
        got = _leaves(batch, device_table)
        assert got.keys() == expected.keys()
        for name, want in expected.items():
            assert got[name].dtype == want.dtype, name
            np.testing.assert_array_equal(got[name], want, err_msg=name)
        assert dataclasses.asdict(variant.sampler) == flags
        assert variant.prompt_logprobs == wants_prompt

        sampled = []
        for row, (seq, count) in enumerate(zip(scheduled, counts)):
            seq.computed += count
            if seq.computed == len(seq.tokens):
                seq.tokens.append(None)
                seq.sampled_in, seq.sampled_row = step_id, row
                sampled.append((seq, len(seq.tokens) - 1, row))
        in_flight.append((StepHandle(None, None, runner._sampled_rows), sampled))
        step_id += 1
        held = {seq.seq_id: seq for seq in running if seq.pages_sent is not None}
        assert runner.input_batch.row_of.keys() == held.keys()
        for seq_id, row in runner.input_batch.row_of.items():
            tokens = held[seq_id].tokens
            known = tokens[:tokens.index(None)] if None in tokens else tokens
            assert runner.input_batch.token_ids[row] == known
    runner.shutdown()


def test_the_runner_imports_nothing_from_the_engine():
    import ast
    import pathlib

    import pjllm.runner

    paths = list(pathlib.Path(pjllm.runner.__file__).parent.glob("*.py"))
    assert len(paths) > 3
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # `from pjllm import engine` too
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            assert not any(name.startswith("pjllm.engine") for name in names), (path.name, names)
