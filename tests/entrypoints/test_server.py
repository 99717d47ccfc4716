"""`pjllm serve` as a client sees it: a real server process on 127.0.0.1 with the default model,
driven by the official openai client and by raw HTTP."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pjllm
from pjllm.models.default_model import download_default_model
from tests.server_process import free_port, wait_until_healthy

KEY = "test-key"
ENGINE_OPTIONS = {"max_model_len": 512, "max_num_seqs": 16, "max_num_batched_tokens": 64}
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_path():
    return download_default_model()


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    """The server process; its URL is `server.url`. Stopped at the end (if a test has not)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    options = [f"--{name.replace('_', '-')}={value}" for name, value in ENGINE_OPTIONS.items()]
    command = [sys.executable, "-m", "pjllm.entrypoints.cli", "serve", model_path, "--port", str(port),
               "--api-key", KEY, "--served-model-name", "smollm2", "--shutdown-timeout", "20",
               "--compilation-cache-dir", str(tmp_path_factory.mktemp("xla")), *options]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    process.url = f"http://127.0.0.1:{port}"
    process.log_path = log_path
    try:
        wait_until_healthy(process.url, [process], [log_path], timeout_s=180)
    except AssertionError as error:
        process.kill()
        pytest.fail(f"the server did not start: {error}")
    yield process
    if process.poll() is None:
        process.kill()
        process.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(model_path):
    with pjllm.LLM(model_path, compilation_cache_dir=None, **ENGINE_OPTIONS) as llm:
        yield llm


def _metrics(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _metric(samples, name, **labels) -> float:
    wanted = {"model_name": "smollm2", **labels}
    return sum(value for (key, sample_labels), value in samples.items()
               if key == name and wanted.items() <= dict(sample_labels).items())


def test_greedy_completion_over_http_equals_llm_generate(client, llm):
    expected = llm.generate(PROMPT, pjllm.SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    response = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0)
    assert response.choices[0].text == expected.outputs[0].text
    assert response.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)

    chunks = list(client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == response.choices[0].finish_reason


def test_chat_streamed_and_not_equals_llm_chat(client, llm):
    expected = llm.chat(QUESTION, pjllm.SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    response = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16,
                                              temperature=0)
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.choices[0].message.role == "assistant"
    assert "Paris" in response.choices[0].message.content
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, max_completion_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].usage.total_tokens == response.usage.total_tokens


def test_stop_strings_and_logprobs_equal_llm_generate(client, llm):
    """The server makes text off the engine's step loop; it must cut at the same places."""
    params = pjllm.SamplingParams(temperature=0.9, top_k=40, max_tokens=24, n=2, seed=11,
                                  stop=[" the", "."], logprobs=2)
    expected = llm.generate(PROMPT, params, use_tqdm=False)[0]
    assert any(c.stop_reason in (" the", ".") for c in expected.outputs)  # the path under test
    response = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=24, n=2, seed=11,
                                         temperature=0.9, stop=[" the", "."], logprobs=2,
                                         extra_body={"top_k": 40, "return_token_ids": True})
    for choice, completion in zip(response.choices, expected.outputs):
        assert choice.text == completion.text
        assert choice.finish_reason == completion.finish_reason
        assert choice.model_extra["token_ids"] == completion.token_ids
        assert choice.logprobs.token_logprobs == pytest.approx(
            [entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs)], abs=1e-5)
    assert response.usage.completion_tokens == sum(len(c.token_ids) for c in expected.outputs)


def test_n_seed_stop_logprobs_and_batched_prompts(client):
    sampled = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0.8,
                                        n=2, seed=7)
    assert sorted(c.index for c in sampled.choices) == [0, 1]
    again = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0.8,
                                      n=2, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]

    stopped = client.completions.create(model="smollm2", prompt="Count: 1, 2, 3,", max_tokens=30,
                                        temperature=0, stop=[","])
    assert stopped.choices[0].finish_reason == "stop" and "," not in stopped.choices[0].text
    # A stop string streamed: no text past it is ever sent.
    streamed = client.completions.create(model="smollm2", prompt="Count: 1, 2, 3,", max_tokens=30,
                                         temperature=0, stop=[","], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == stopped.choices[0].text

    with_logprobs = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=6, temperature=0,
                                              logprobs=3)
    logprobs = with_logprobs.choices[0].logprobs
    assert "".join(logprobs.tokens) == with_logprobs.choices[0].text
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 4 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 2 for entry in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob

    token_ids = httpx.post(f"{client.base_url}".removesuffix("/v1/") + "/tokenize",
                           json={"prompt": PROMPT}, timeout=30).json()["tokens"]
    batch = client.completions.create(model="smollm2", prompt=[PROMPT, "Hello"], max_tokens=4, temperature=0)
    by_ids = client.completions.create(model="smollm2", prompt=token_ids, max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_ids.choices[0].text
    echoed = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + by_ids.choices[0].text


BAD_INPUTS = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": "high"}, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [10**7]}, "prompt_token_ids"),
    ("/v1/completions", {"prompt": "x" * 4000}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 10**6}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**7]}, "stop_token_ids"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "x", "cache_salt": ""}, "cache_salt"),
    ("/v1/completions", {"prompt": "x", "priority": 3}, "priority"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
]


@pytest.mark.parametrize("path,body,param", BAD_INPUTS)
def test_bad_input_is_a_400_naming_the_field(server, path, body, param):
    response = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "BadRequestError" and error["message"]


def test_malformed_json_key_and_model(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    malformed = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=headers, timeout=30)
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    for auth in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=auth, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["type"] == "AuthenticationError"
    unknown = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "model": "gpt-9"},
                         headers=headers, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # open without a key
    assert httpx.get(server.url + "/version", timeout=10).json()["version"] == pjllm.__version__
    models = httpx.get(server.url + "/v1/models", headers=headers, timeout=10).json()
    assert models["data"][0]["id"] == "smollm2"


def test_tokenize_and_detokenize(server):
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, timeout=30).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}, timeout=30).json()
    assert text["prompt"] == PROMPT
    chat = httpx.post(server.url + "/tokenize", json={"messages": QUESTION}, timeout=30).json()
    assert chat["count"] > tokens["count"]


def test_a_burst_with_disconnects_is_all_answered_and_leaves_nothing_held(server):
    headers = {"Authorization": f"Bearer {KEY}"}

    async def one(client, index):
        body = {"prompt": f"Story number {index}:", "max_tokens": 24, "temperature": 0.7, "seed": index,
                "stream": True, "ignore_eos": True}
        chunks = 0
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "done"
                payload = json.loads(line[len("data: "):])
                assert "error" not in payload, payload
                chunks += 1
                if index % 3 == 0 and chunks == 2:
                    return "left"  # leaving the block closes the connection mid-stream
        return "cut"

    async def health_under_load(client):
        await asyncio.sleep(0.5)  # the burst is being admitted and prefilled
        return [(await client.get("/health", timeout=10)).status_code for _ in range(3)]

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(health_under_load(client),
                                        *[one(client, index) for index in range(12)])

    health, *results = asyncio.run(burst())
    assert health == [200, 200, 200]
    assert results.count("left") == 4 and results.count("done") == 8
    # A client that gives up on a non-streamed request also frees it.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", headers=headers, timeout=1.0,
                   json={"prompt": "A long story:", "max_tokens": 400, "ignore_eos": True})
    deadline = time.monotonic() + 30
    while True:
        samples = _metrics(server)
        idle = (_metric(samples, "pjllm:num_requests_running") == 0
                and _metric(samples, "pjllm:num_requests_waiting") == 0
                and _metric(samples, "pjllm:kv_cache_usage_perc") == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle, "requests or pages still held after the burst"
    assert _metric(samples, "pjllm:request_success_total", finished_reason="abort") >= 5
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_metrics_parse_and_count_finished_requests(server, client):
    before = _metrics(server)
    client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = _metrics(server)
    assert _metric(after, "pjllm:generation_tokens_total") - _metric(before, "pjllm:generation_tokens_total") == 5
    assert _metric(after, "pjllm:prompt_tokens_total") > _metric(before, "pjllm:prompt_tokens_total")
    for name in ("pjllm:request_success_total", "pjllm:e2e_request_latency_seconds_count",
                 "pjllm:time_to_first_token_seconds_count", "pjllm:request_queue_time_seconds_count"):
        assert _metric(after, name) == _metric(before, name) + 1, name
    assert _metric(after, "pjllm:inter_token_latency_seconds_count") >= \
        _metric(before, "pjllm:inter_token_latency_seconds_count") + 1


def test_prefix_cache_hits_show_in_usage_and_metrics_and_salts_separate(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    prompt = " ".join(f"word{i}" for i in range(40))  # several 16-token pages

    def cached_tokens(salt):
        body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "cache_salt": salt}
        response = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    before = _metrics(server)
    assert cached_tokens("first") == 0
    hit = cached_tokens("first")
    assert hit > 0 and hit % 16 == 0
    assert cached_tokens("second") == 0
    after = _metrics(server)
    assert _metric(after, "pjllm:prefix_cache_hits_total") - _metric(before, "pjllm:prefix_cache_hits_total") == hit
    assert _metric(after, "pjllm:prefix_cache_queries_total") > _metric(before, "pjllm:prefix_cache_queries_total")


def test_sigterm_lets_running_requests_finish_and_exits_zero(server):
    """Last in this module: it stops the server."""
    lines = []

    def stream():
        body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as response:
            lines.extend(line for line in response.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 60
    while not lines and time.monotonic() < deadline:
        time.sleep(0.05)
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0, server.log_path.read_text()[-3000:]
    reader.join(10)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length"
