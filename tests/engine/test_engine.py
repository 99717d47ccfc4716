"""The engine end to end on a tiny random-weight Llama: batching, preemption, stops, bad input."""

import json

import numpy as np
import pytest

import pjllm
from pjllm import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(count, seed=0, low=3, high=30):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, rng.integers(low, high)).tolist() for _ in range(count)]


def _solo(llm, prompts, params):
    return [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0].token_ids
            for p in prompts]


def _run_staggered(engine, prompts, params, arrival_steps):
    """Adds prompt i at step arrival_steps[i]; returns each request's final token ids."""
    results, step = {}, 0
    pending = sorted(zip(arrival_steps, range(len(prompts))))
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            index = pending.pop(0)[1]
            engine.add_request(f"r{index}", {"prompt_token_ids": prompts[index]}, params)
        for output in engine.step():
            if output.finished:
                results[int(output.request_id[1:])] = output.outputs[0].token_ids
        step += 1
    return [results[i] for i in range(len(prompts))]


def test_requests_arriving_at_different_steps_match_solo_runs(make_llm):
    llm = make_llm()
    prompts = _prompts(6)
    solo = _solo(llm, prompts, GREEDY)
    staggered = _run_staggered(llm.engine, prompts, GREEDY, [0, 0, 1, 3, 4, 9])
    assert staggered == solo
    assert all(len(tokens) == 12 for tokens in solo)


def test_preemption_under_tiny_page_budget_loses_nothing(make_llm):
    prompts = _prompts(6, seed=1, low=20, high=40)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    roomy = make_llm()
    expected = _solo(roomy, prompts, params)
    tight = make_llm(num_pages=16)  # 128 tokens of KV for six ~60-token sequences
    outputs = tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


def test_block_table_writes_split_over_calls_lose_nothing(make_llm, monkeypatch):
    """The device's block table gets each step's changed entries a few at a time: rows freed
    and reused under preemption still read exactly their own pages."""
    from pjllm.runner import model_runner

    prompts = _prompts(6, seed=1, low=20, high=40)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = _solo(make_llm(), prompts, params)
    monkeypatch.setattr(model_runner, "TABLE_WRITES_PER_CALL", 3)
    tight = make_llm(num_pages=16)
    outputs = tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.model_runner.programs.is_ready(("table_writes", 3))
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_seeded_sampling_does_not_depend_on_the_batch(make_llm):
    llm = make_llm()
    prompts = _prompts(5, seed=2)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)[0]
    others = SamplingParams(temperature=0.7, max_tokens=7, ignore_eos=True)
    batch = llm.generate([{"prompt_token_ids": p} for p in prompts],
                         [params] + [others] * 4, use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone.outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=99, ignore_eos=True)
    different = llm.generate({"prompt_token_ids": prompts[0]}, other_seed, use_tqdm=False)[0]
    assert different.outputs[0].token_ids != alone.outputs[0].token_ids


def test_top_k_request_samples_the_same_whether_or_not_its_steps_sort(make_llm):
    llm = make_llm()
    prompts = [{"prompt_token_ids": p} for p in _prompts(3, seed=3)]
    top_k = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, max_tokens=10, seed=7,
                           ignore_eos=True)
    alone = llm.generate(prompts[1], top_k, use_tqdm=False)[0].outputs[0].token_ids
    variants = {key[2] for key in llm.engine.model_runner.programs._futures if key[0] == "sampler"}
    assert any(flags.threshold_method == "top_k_prefix" for flags in variants)  # top_k 50 needs no sort
    top_p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=8, ignore_eos=True)
    batch = llm.generate(prompts, [top_p, top_k, top_p], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    variants = {key[2] for key in llm.engine.model_runner.programs._futures if key[0] == "sampler"}
    assert any(flags.use_top_k_top_p and flags.threshold_method == "sort" for flags in variants)


def test_n_samples_and_logprobs(make_llm):
    llm = make_llm()
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=5, logprobs=3, ignore_eos=True)
    (output,) = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, params, use_tqdm=False)
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
    for completion in output.outputs:
        assert len(completion.logprobs) == 6
        for token, entry in zip(completion.token_ids, completion.logprobs):
            assert token in entry and 3 <= len(entry) <= 4
            ranks = sorted(lp.rank for lp in entry.values() if lp.rank is not None)
            assert ranks[:3] == [1, 2, 3]
        total = sum(entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs))
        assert completion.cumulative_logprob == pytest.approx(total, rel=1e-5)


def test_stop_token_ids_min_tokens_and_length(make_llm):
    llm = make_llm()
    prompt = {"prompt_token_ids": [9, 10, 11]}
    free = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    stopped = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                  stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == free.token_ids[:first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_at)
    assert free.finish_reason == "length"
    # min_tokens bans the stop token until enough tokens exist.
    held = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                               stop_token_ids=[stop_at], min_tokens=first + 2),
                        use_tqdm=False)[0].outputs[0]
    assert stop_at not in held.token_ids[:first + 2]


def test_eos_stops_unless_ignored(make_llm):
    llm = make_llm()
    eos = llm.engine.model_config.eos_token_ids[0]
    for prompt in _prompts(20, seed=3):
        tokens = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        if eos in tokens:
            out = llm.generate({"prompt_token_ids": prompt},
                               SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
            assert out.outputs[0].token_ids == tokens[:tokens.index(eos) + 1]
            assert out.outputs[0].finish_reason == "stop"
            return
    pytest.skip("no greedy continuation hit EOS")


def test_prompt_logprobs_cover_every_prompt_token(make_llm):
    llm = make_llm(max_num_batched_tokens=16)  # the 40-token prompt is prefilled in chunks
    prompt = _prompts(1, seed=4, low=40, high=41)[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2, ignore_eos=True)
    (output,) = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    assert output.prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entry = output.prompt_logprobs[position]
        assert prompt[position] in entry and entry[prompt[position]].logprob <= 0
    whole = make_llm()  # the same logprobs without chunking
    (unchunked,) = whole.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    for a, b in zip(output.prompt_logprobs[1:], unchunked.prompt_logprobs[1:]):
        assert {t: lp.logprob for t, lp in a.items()} == pytest.approx({t: lp.logprob for t, lp in b.items()},
                                                                        abs=1e-4)


def test_a_chunked_prompt_matches_unchunked_and_decodes_go_on_meanwhile(make_llm):
    """A prompt longer than the token budget: the same greedy tokens and logprobs as prefilled
    whole, and the running decodes each get a token every step while it is prefilled."""
    long_prompt = _prompts(1, seed=6, low=70, high=71)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True)
    (whole,) = make_llm(max_num_batched_tokens=128).generate(
        {"prompt_token_ids": long_prompt}, params, use_tqdm=False)
    llm = make_llm(max_num_batched_tokens=16)
    engine = llm.engine
    decode_params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for index, prompt in enumerate(_prompts(3, seed=7, low=3, high=5)):
        engine.add_request(f"d{index}", {"prompt_token_ids": prompt}, decode_params)
    for _ in range(3):  # the decodes are running
        engine.step()
    engine.add_request("long", {"prompt_token_ids": long_prompt}, params)
    counts, chunked = {}, None
    long_seq = engine.requests["long"].seqs[0]
    steps_prefilling = 0
    while not long_seq.is_prefill_done:
        outputs = {o.request_id: o for o in engine.step()}
        steps_prefilling += 1
        for request_id in ("d0", "d1", "d2"):
            produced = len(outputs[request_id].outputs[0].token_ids)
            if request_id in counts:
                assert produced == counts[request_id] + 1
            counts[request_id] = produced
    assert steps_prefilling >= 5  # 70 tokens, at most 13 a step beside three decodes
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == "long" and output.finished:
                chunked = output
    assert chunked.outputs[0].token_ids == whole.outputs[0].token_ids
    for a, b in zip(chunked.outputs[0].logprobs, whole.outputs[0].logprobs):
        assert {t: lp.logprob for t, lp in a.items()} == pytest.approx(
            {t: lp.logprob for t, lp in b.items()}, abs=1e-4)


def test_pallas_backend_matches_reference_greedy(make_llm):
    prompts = _prompts(3, seed=5)
    reference = _solo(make_llm(attention_backend="reference"), prompts, GREEDY)
    llm = make_llm(attention_backend="pallas")
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference


def test_async_scheduling_gives_the_same_outputs_as_one_step_at_a_time(make_llm):
    prompts = [{"prompt_token_ids": p} for p in _prompts(6, seed=6)]
    stop_token = 17
    params = [
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20),  # may stop at EOS
        SamplingParams(temperature=0.9, max_tokens=12, seed=3, stop_token_ids=[stop_token]),
        SamplingParams(n=2, temperature=1.0, max_tokens=7, seed=4, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.8, max_tokens=10, seed=5, repetition_penalty=1.3,
                       frequency_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=5, min_tokens=3, ignore_eos=True),
    ]

    def run(**options):
        llm = make_llm(**options)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]

    overlapped = run(async_scheduling=True)
    assert overlapped == run(async_scheduling=False)
    assert overlapped == run(async_scheduling=True, num_pages=20)  # with preemptions too


def test_async_scheduling_dispatches_before_processing(make_llm):
    llm = make_llm()
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, GREEDY)
    assert engine.step() == []  # the prefill is dispatched; nothing processed yet
    first = engine.step()  # the first decode is dispatched, then the prefill's token processed
    assert [len(o.outputs[0].token_ids) for o in first] == [1]
    seq = engine.requests["a"].seqs[0]
    assert seq.num_pending == 1  # the decode's token is still on device
    llm.engine.run_to_completion()


def test_a_sliding_window_does_not_limit_the_context(tiny_model_path, tmp_path):
    """Windowed attention runs for real (tests/models/test_hf_parity.py, mistral_window), so a
    Mistral's contexts reach its max_position_embeddings, not its window."""
    config = json.loads(open(tiny_model_path).read())
    path = tmp_path / "mistral.json"
    path.write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"], "sliding_window": 64}))
    options = dict(load_format="dummy", dtype="float32", num_pages=32, page_size=8,
                   compilation_cache_dir=None)
    llm = pjllm.LLM(str(path), **options)
    assert llm.engine.max_model_len == config["max_position_embeddings"] > 64
    config = llm.engine.model_config
    assert [config.layer_window(i) for i in range(config.num_layers)] == [64] * config.num_layers


def test_a_windowed_model_holds_only_its_window(tiny_model_path, tmp_path):
    """Every layer windowed (16 tokens): a long generation holds the pages of its window (and
    the page being written), not of its whole context; parity with transformers through such
    a window is tests/models/test_hf_parity.py's mistral_window."""
    config = json.loads(open(tiny_model_path).read())
    path = tmp_path / "mistral.json"
    path.write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"], "sliding_window": 16}))
    llm = pjllm.LLM(str(path), load_format="dummy", dtype="float32", num_pages=64, page_size=8,
                    compilation_cache_dir=None)
    engine, manager = llm.engine, llm.engine.kv_cache_manager
    for i, prompt in enumerate(_prompts(3, seed=4, low=20, high=30)):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=80, ignore_eos=True))
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        seqs = [seq for request in engine.requests.values() for seq in request.seqs]
        manager.check_invariants(seqs)
        most = max([most] + [len(manager.held_pages(seq)) for seq in seqs])
    assert most <= 16 // 8 + 2  # not the ~14 pages of a 110-token context
    assert manager.num_free_pages == manager.num_pages


def test_background_warmup_serves_at_once_and_changes_no_output(make_llm):
    prompts = [{"prompt_token_ids": p} for p in _prompts(5, seed=8)]
    params = SamplingParams(temperature=0.7, max_tokens=6, seed=1, ignore_eos=True)
    lazy = make_llm(warmup="off")
    want = [o.outputs[0].token_ids for o in lazy.generate(prompts, params, use_tqdm=False)]
    llm = make_llm(warmup="background")  # steps start while the warmup compiles
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.engine.wait_for_warmup()
    assert got == want
    runner = llm.engine.model_runner
    assert all(runner.programs.is_ready(key) for key in runner.program_keys())
    assert len(runner.programs) == len(runner.program_keys())  # the steps used the warmup's programs
    assert llm.engine.startup_timings["compile_s"] > 0


def test_priority_policy_runs_lower_values_first(make_llm):
    llm = make_llm(scheduling_policy="priority", max_num_seqs=1)
    prompts = [{"prompt_token_ids": p} for p in _prompts(3, seed=8)]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False, priority=[2, 0, 1])
    started = [o.metrics.first_scheduled_time for o in outputs]
    assert started[1] < started[2] < started[0]
    # The same tokens as without priorities: only the order changed.
    assert [o.outputs[0].token_ids for o in outputs] == _solo(llm, [p["prompt_token_ids"] for p in prompts],
                                                              GREEDY)


def test_priority_needs_the_priority_policy(make_llm):
    llm = make_llm()
    with pytest.raises(ValueError, match="priority must be 0 unless scheduling_policy"):
        llm.generate({"prompt_token_ids": [5, 6]}, GREEDY, use_tqdm=False, priority=[1])
    with pytest.raises(ValueError, match="priority must be a list"):
        llm.generate({"prompt_token_ids": [5, 6]}, GREEDY, use_tqdm=False, priority=[0, 0])
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_llm(scheduling_policy="lifo")


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_swap_and_recompute_preemption_lose_nothing(make_llm, policy):
    """Under a page budget that forces preemption, swapping KV to host memory and back gives
    the same greedy tokens as recomputing it, and as no preemption at all."""
    prompts = _prompts(6, seed=1, low=20, high=40)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=2)
    expected = make_llm().generate([{"prompt_token_ids": p} for p in prompts], params,
                                   use_tqdm=False)
    for mode in ("swap", "recompute"):
        # No prefix caching: a readmitted sequence must get its KV back from host memory or
        # from its tokens, not from cached pages.
        llm = make_llm(num_pages=16, preemption_mode=mode, scheduling_policy=policy,
                       enable_prefix_caching=False)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        scheduler = llm.engine.scheduler
        assert scheduler.num_preemptions > 0
        assert (scheduler.num_swaps > 0) == (mode == "swap")
        assert scheduler.num_swapped_pages == 0 and not scheduler.swapped
        runner = llm.engine.model_runner  # a warmup would have built every program it used
        assert set(runner.programs.keys()) <= set(runner.program_keys())
        assert any(key[0] == "swap_in" for key in runner.program_keys()) == (mode == "swap")
        for got, want in zip(outputs, expected):
            assert got.outputs[0].token_ids == want.outputs[0].token_ids
            for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
                assert {t: lp.logprob for t, lp in a.items()} == pytest.approx(
                    {t: lp.logprob for t, lp in b.items()}, abs=1e-4)


def test_swap_space_bounds_what_is_swapped(make_llm):
    llm = make_llm(num_pages=16, preemption_mode="swap", swap_space=0.0,
                   enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in _prompts(6, seed=1, low=20, high=40)], params,
                 use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.scheduler.num_swaps == 0
    with pytest.raises(ValueError, match="swap_space"):
        make_llm(swap_space=-1)
    with pytest.raises(ValueError, match="preemption_mode"):
        make_llm(preemption_mode="drop")
