"""The runner's persistent batch: every sequence the runner holds, one row each, kept across steps.

The scheduler's messages (pjllm/scheduler_output.py) add, extend and remove sequences; what the
runner needs of them lives in per-row numpy arrays, so a step is built by gathering the rows it
runs, whatever the batch size, rather than by walking sequence objects.

The block tables also live on the device, where a step reads its rows: the batch records each
entry it changes (`take_table_writes`), so a step sends those few entries rather than its rows'
whole tables, whose width grows with max_model_len.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from pjllm.scheduler_output import NewSequence, SchedulerOutput

# Width of each row's banned-token list (min_tokens bans EOS and the stop ids): fixed, so the
# sampler's inputs never change shape; the engine refuses a request whose list would not fit.
MAX_BANNED_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class SampledRows:
    """Where one step's sampled tokens go once fetched (S = the rows that sampled).

    rows:      i64[S] the batch rows that sampled
    add_ids:   i64[S] which add of a sequence each row held then (rows and seq ids are reused)
    step_rows: i64[S] each one's row in the step's outputs
    """

    rows: np.ndarray
    add_ids: np.ndarray
    step_rows: np.ndarray


class InputBatch:
    """R = max_num_seqs rows, W = the most pages a sequence can have, Kb = MAX_BANNED_TOKENS.

    A sequence takes a free row when it joins and gives it back when removed. Row R (one past
    the last) is never used: it holds neutral values (greedy, no filter, no pages), so padding
    rows of a step are gathered from it like any other row.

    Per row:
      token_ids[r]             the token ids the host knows: those it was sent, then those the
                               runner sampled, appended when their step is fetched
      num_tokens               i32[R+1] tokens including ones sampled but not yet fetched
      num_prompt_tokens        i32[R+1]
      num_computed_tokens      i32[R+1] tokens whose KV the prepared steps write
      num_pages, block_tables  i32[R+1], i32[R+1, W] its pages, in order, 0 beyond (the
                               device's copy matches once the pending writes are applied)
      temperature, top_k (>= vocab resolved to 0), top_p, min_p, presence_penalty,
      frequency_penalty, repetition_penalty, seeds (u32), sample_index, min_tokens: [R+1]
      banned_while_short       i32[R+1, Kb] -1 padded
      filters, uses_penalties, wants_prompt_logprobs: bool[R+1], what selects
                               the step's programs
      add_id                   i64[R+1] which add the row's contents come from (-1: free)
      sampled_in_step          i64[R+1] the step that sampled the row's newest token (-1: none;
                               steps are numbered from 1),
      sampled_at_row           i32[R+1] and its row in that step's outputs
    """

    def __init__(self, max_num_seqs: int, max_pages_per_seq: int, vocab_size: int):
        self.vocab_size = vocab_size
        self.padding_row = max_num_seqs
        self.row_of: dict[int, int] = {}
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.token_ids: list[list[int]] = [[] for _ in range(max_num_seqs)]
        rows = max_num_seqs + 1

        def column(dtype, fill=0) -> np.ndarray:
            return np.full(rows, fill, dtype)

        self.num_tokens = column(np.int32)
        self.num_prompt_tokens = column(np.int32)
        self.num_computed_tokens = column(np.int32)
        self.num_pages = column(np.int32)
        self.block_tables = np.zeros((rows, max_pages_per_seq), np.int32)
        self.temperature = column(np.float32)
        self.top_k = column(np.int32)
        self.top_p = column(np.float32, 1.0)
        self.min_p = column(np.float32)
        self.presence_penalty = column(np.float32)
        self.frequency_penalty = column(np.float32)
        self.repetition_penalty = column(np.float32, 1.0)
        self.seeds = column(np.uint32)
        self.sample_index = column(np.int32)
        self.min_tokens = column(np.int32)
        self.banned_while_short = np.full((rows, MAX_BANNED_TOKENS), -1, np.int32)
        self.filters = column(bool)
        self.uses_penalties = column(bool)
        self.wants_prompt_logprobs = column(bool)
        self.add_id = column(np.int64, -1)
        self.sampled_in_step = column(np.int64, -1)
        self.sampled_at_row = column(np.int32)
        self._num_adds = 0
        # Block table entries changed since the last `take_table_writes`: (flat index, page id)
        # arrays, in the order they were made.
        self._table_writes: list[tuple[np.ndarray, np.ndarray]] = []
        # The id of the step prepared last, 0 before the first.
        self.last_step = 0

    def apply(self, message: SchedulerOutput) -> None:
        """Applies a message's diff: reset, removals, new sequences, new pages, in that order (a
        preempted sequence can be removed and added again in one message)."""
        if message.reset_batch:
            for seq_id in list(self.row_of):
                self.remove(seq_id)
        for seq_id in message.removed_seq_ids:
            self.remove(seq_id)
        for new in message.new_seqs:
            self.add(new)
        self.append_pages([(new.seq_id, new.page_ids) for new in message.new_seqs]
                          + list(message.new_page_ids.items()))

    def rows(self, seq_ids: list[int]) -> np.ndarray:
        """i64[len(seq_ids)]: the row of each sequence."""
        row_of = self.row_of
        return np.array([row_of[seq_id] for seq_id in seq_ids], np.int64)

    def sampled_by_last_step(self, rows: np.ndarray) -> np.ndarray:
        """bool[n]: whether each row's newest token comes from the step prepared last (so it is
        in that step's outputs on device, and maybe not fetched yet)."""
        return self.sampled_in_step[rows] == self.last_step

    def add(self, new: NewSequence) -> None:
        assert new.seq_id not in self.row_of, f"sequence {new.seq_id} is in the batch already"
        row = self._free_rows.pop()
        self.row_of[new.seq_id] = row
        params = new.params
        # Its own list: the runner appends the tokens it samples.
        self.token_ids[row] = list(new.token_ids)
        self.num_tokens[row] = len(new.token_ids)
        self.num_prompt_tokens[row] = new.num_prompt_tokens
        self.num_computed_tokens[row] = new.num_computed_tokens
        # The row's table is all zeros (`remove` cleared it); its pages come with the message's
        # other new pages.
        # top_k at or above the vocabulary keeps every token: off, as vLLM treats it.
        top_k = params.top_k if params.top_k < self.vocab_size else 0
        self.temperature[row] = params.temperature
        self.top_k[row] = top_k
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.presence_penalty[row] = params.presence_penalty
        self.frequency_penalty[row] = params.frequency_penalty
        self.repetition_penalty[row] = params.repetition_penalty
        self.seeds[row] = new.seed
        self.sample_index[row] = new.sample_index
        self.min_tokens[row] = params.min_tokens
        self.banned_while_short[row] = -1
        self.banned_while_short[row, :len(new.banned_while_short)] = new.banned_while_short
        self.filters[row] = not params.is_greedy and (top_k > 0 or params.top_p < 1.0)
        self.uses_penalties[row] = params.uses_penalties
        self.wants_prompt_logprobs[row] = params.prompt_logprobs is not None
        self.add_id[row] = self._num_adds
        self._num_adds += 1
        self.sampled_in_step[row] = -1

    def remove(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id)
        self.token_ids[row] = []
        held = int(self.num_pages[row])
        self._write_table(np.full(held, row), np.arange(held), np.zeros(held, np.int32))
        self.num_pages[row] = 0
        self.add_id[row] = -1  # a step still in flight records nothing here
        self._free_rows.append(row)

    def append_pages(self, page_ids: list[tuple[int, list[int]]]) -> None:
        """Appends pages to block tables: (seq_id, its new pages) pairs, each sequence once."""
        if not page_ids:
            return
        rows = self.rows([seq_id for seq_id, _ in page_ids])
        counts = np.array([len(pages) for _, pages in page_ids])
        flat = np.fromiter(itertools.chain.from_iterable(pages for _, pages in page_ids), np.int32,
                           int(counts.sum()))
        within = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
        self._write_table(np.repeat(rows, counts), np.repeat(self.num_pages[rows], counts) + within,
                          flat)
        self.num_pages[rows] += counts

    def _write_table(self, rows: np.ndarray, columns: np.ndarray, page_ids: np.ndarray) -> None:
        self.block_tables[rows, columns] = page_ids
        if len(page_ids):
            width = self.block_tables.shape[1]
            self._table_writes.append(((rows * width + columns).astype(np.int32),
                                       page_ids.astype(np.int32)))

    def take_table_writes(self) -> tuple[np.ndarray, np.ndarray]:
        """The block table entries changed since the last call, for the device's copy: (flat
        indices into block_tables, i32[U]; their page ids, i32[U]), each index once, with the
        value it holds now (a row cleared and reused in one message is written once)."""
        if not self._table_writes:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        indices, page_ids = (np.concatenate(parts) for parts in zip(*self._table_writes))
        self._table_writes = []
        indices, last = np.unique(indices[::-1], return_index=True)  # the latest write wins
        return indices, page_ids[::-1][last]

    def advance(self, rows: np.ndarray, num_new_tokens: np.ndarray) -> SampledRows:
        """Moves the rows of the step just prepared past their chunks. A chunk that reaches its
        sequence's last token samples the next one: it counts from now on, and until it is
        fetched the next step reads it on device, from this step's outputs."""
        stop = self.num_computed_tokens[rows] + num_new_tokens
        samples = stop == self.num_tokens[rows]
        self.num_computed_tokens[rows] = stop
        sampled = rows[samples]
        step_rows = np.flatnonzero(samples)
        self.last_step += 1
        self.num_tokens[sampled] += 1
        self.sampled_in_step[sampled] = self.last_step
        self.sampled_at_row[sampled] = step_rows
        return SampledRows(sampled, self.add_id[sampled], step_rows)

    def record_sampled(self, sampled: SampledRows, token_ids: np.ndarray) -> None:
        """Appends a fetched step's tokens (`token_ids` i32[N], by step row) to the rows that
        still hold the sequence that sampled them."""
        current = self.add_id[sampled.rows] == sampled.add_ids
        tokens = token_ids[sampled.step_rows[current]].tolist()
        for row, token in zip(sampled.rows[current].tolist(), tokens):
            self.token_ids[row].append(token)
