"""What the scheduler tells the model runner each step: a diff over the batch the runner keeps.

Plain picklable data (ints, lists, SamplingParams), so that the engine and the runner share no
objects: the same message can later be broadcast to tensor-parallel or multi-host replicas.
A sequence's prompt, parameters and first pages travel once, when it joins; afterwards a step
names it by id with its token count and any pages it was given since. The runner works out the
rest (positions, whether a chunk samples, the sampling step) from what it was sent.
"""

from __future__ import annotations

import dataclasses

from pjllm.sampling_params import SamplingParams


@dataclasses.dataclass
class NewSequence:
    """A sequence the runner does not hold yet: first scheduled, readmitted after preemption, or
    sent again after the runner's batch was reset.

    token_ids:           every token id the host knows: the prompt, then the outputs generated
                         so far (a readmitted sequence recomputes them)
    num_prompt_tokens:   where the outputs start in token_ids
    num_computed_tokens: tokens whose KV is already in its pages (a cached prefix, or what it had
                         computed when sent again after a reset)
    params:              its request's sampling parameters
    seed, sample_index:  its sampling key (fold_in(fold_in(key(seed), sample_index), step))
    banned_while_short:  EOS and stop token ids, banned while it has fewer than params.min_tokens
                         outputs
    page_ids:            its KV pages so far, in order (its block table)
    """

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    params: SamplingParams
    seed: int
    sample_index: int
    banned_while_short: tuple[int, ...]
    page_ids: list[int]


@dataclasses.dataclass
class SchedulerOutput:
    """One step's message. The runner applies it in field order: reset, removals, new
    sequences, new pages; then the step runs `scheduled_seq_ids` in that order, which is also
    the order of its sampled rows.

    reset_batch:          drop every sequence held before this message (sent after a message may
                          not have been applied; each running sequence comes again as new)
    removed_seq_ids:      sequences finished or preempted since the previous message; a preempted
                          one may come back as new in the same message, under the same id
    new_seqs:             sequences joining the batch (each is also in scheduled_seq_ids)
    new_page_ids:         seq_id -> pages appended to the block table of a sequence already held
    scheduled_seq_ids:    the sequences this step runs, one row each
    num_scheduled_tokens: tokens each of them computes this step: a prefill chunk, or 1
    """

    reset_batch: bool
    removed_seq_ids: list[int]
    new_seqs: list[NewSequence]
    new_page_ids: dict[int, list[int]]
    scheduled_seq_ids: list[int]
    num_scheduled_tokens: list[int]
