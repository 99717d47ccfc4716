"""`pjllm bench serve` against a stub OpenAI server (stub_openai_server.py): what is counted, when
requests are sent, how many run at once, how failures are reported. Only lower bounds on time are
asserted (a loaded machine makes everything slower, never faster)."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np
import pytest

from pjllm.bench import serve
from pjllm.bench.completions_client import ServerSentEvents
from pjllm.entrypoints.cli import build_parser, main
from stub_openai_server import MODEL_ID, StubServer

CONFIG = "tests/golden/llama3/config.json"  # vocab 256, BOS 1, EOS 2
EARLY_WAKEUP_S = 0.005                      # how much earlier than asked a sleep may return


@pytest.fixture(scope="module")
def server():
    with StubServer() as stub:
        yield stub


@pytest.fixture
def stub(server):
    server.reset()
    return server


def _args(stub: StubServer, *options: str):
    return build_parser().parse_args(["bench", "serve", "--base-url", stub.url, "--model-config", CONFIG,
                                      "--disable-tqdm", *options])


def _measure(stub: StubServer, *options: str) -> dict:
    return asyncio.run(serve.measure_async(_args(stub, *options), progress_enabled=False))


def _write_prompts(path, prompts, output_len=3):
    path.write_text("".join(json.dumps({"prompt": p, "output_len": output_len}) + "\n" for p in prompts))
    return str(path)


def test_metrics_are_counted(stub):
    record = _measure(stub, "--num-prompts", "6", "--input-len", "5", "--output-len", "4")
    assert (record["completed"], record["failed"], record["errors"]) == (6, 0, {})
    assert record["model"] == MODEL_ID and record["dataset"] == "random"
    assert record["total_prompt_tokens"] == 6 * 5 and record["total_output_tokens"] == 6 * 4
    assert record["expected_output_tokens"] == 6 * 4
    per_request = record["per_request"]
    assert per_request["output_tokens"] == [4] * 6 and per_request["status"] == [200] * 6
    for ttft, e2e, itls, tpot in zip(per_request["ttft_s"], per_request["e2e_s"], per_request["itl_s"],
                                     per_request["tpot_s"]):
        assert 0 < ttft < e2e and len(itls) == 4 - 1 and tpot == pytest.approx((e2e - ttft) / 3)
    assert record["mean_ttft_ms"] <= record["p99_ttft_ms"] and record["median_itl_ms"] > 0
    assert record["output_tokens_per_s"] == pytest.approx(24 / record["elapsed_s"])

    assert record["short_or_long_outputs"] == 0
    # The test request (a prompt of the same dataset, not one of the timed ones), then one per prompt.
    assert len(stub.bodies) == 1 + 6 and stub.bodies[0]["prompt"] not in [b["prompt"] for b in stub.bodies[1:]]
    for body in stub.bodies:
        assert body["model"] == MODEL_ID and body["max_tokens"] == 4
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["temperature"] == 1.0
        assert len(body["prompt"]) == 5 and not {1, 2} & set(body["prompt"])
        assert all(0 <= token < 256 for token in body["prompt"])


def test_tokens_are_counted_without_a_usage_chunk(stub):
    stub.reset(include_usage=False)
    record = _measure(stub, "--num-prompts", "3", "--input-len", "2", "--output-len", "5")
    assert record["completed"] == 3 and record["total_output_tokens"] == 15
    assert record["total_prompt_tokens"] == 6  # token-id prompts: their length as sent


def test_a_stream_of_one_finishing_chunk_without_text_succeeds(stub):
    """A server that fell behind sends a short request's tokens with its finish; without a
    tokenizer the chunk has no text (seen on the GPU machine: 1 of 1000 requests)."""
    stub.reset(coalesce=True)
    record = _measure(stub, "--num-prompts", "3", "--input-len", "2", "--output-len", "5")
    assert (record["completed"], record["failed"]) == (3, 0)
    assert record["total_output_tokens"] == 15 and record["mean_ttft_ms"] > 0


def test_max_concurrency_is_respected(stub):
    record = _measure(stub, "--num-prompts", "8", "--input-len", "2", "--output-len", "6",
                      "--max-concurrency", "2")
    assert record["completed"] == 8 and record["settings"]["max_concurrency"] == 2
    assert 1 <= stub.peak_in_flight <= 2


def test_without_max_concurrency_every_request_is_in_flight_at_once(stub, tmp_path):
    # More streams than an HTTP client's default connection pool (aiohttp's is 100) holds: each
    # "hold" stream sends no token until all of them are open.
    stub.reset(hold_streams=120)
    path = _write_prompts(tmp_path / "p.jsonl", ["hello"] + ["hold"] * 120, output_len=2)
    record = _measure(stub, "--dataset-path", path, "--timeout", "60")
    assert record["completed"] == 121 and stub.peak_in_flight >= 120


def test_arrival_offsets_follow_the_rate_and_burstiness():
    rng = np.random.default_rng(0)
    assert not serve.arrival_offsets(5, float("inf"), 1.0, rng).any()
    offsets = serve.arrival_offsets(4000, 10.0, 1.0, rng)
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential: CV 1
    bursty, regular = (np.diff(serve.arrival_offsets(4000, 10.0, shape, rng)) for shape in (0.25, 4.0))
    assert bursty.mean() == pytest.approx(0.1, rel=0.1) and regular.mean() == pytest.approx(0.1, rel=0.05)
    assert bursty.std() / bursty.mean() > 1.5 and regular.std() / regular.mean() < 0.7  # CV 2, 0.5


def test_requests_are_sent_at_their_arrival_times(stub):
    record = _measure(stub, "--num-prompts", "10", "--input-len", "2", "--output-len", "2",
                      "--request-rate", "50", "--seed", "3")
    offsets = serve.arrival_offsets(10, 50.0, 1.0, np.random.default_rng(3))
    sent = np.array(record["per_request"]["sent_at_s"])
    assert record["completed"] == 10 and record["settings"]["request_rate"] == 50.0
    assert (sent >= offsets - EARLY_WAKEUP_S).all()
    assert record["elapsed_s"] >= offsets[-1] and len(stub.arrivals) == 1 + 10


def test_failures_are_reported_not_raised(stub, tmp_path):
    prompts = ["hello", "fail:503", "fail:midstream", "fail:disconnect", "fail:nodone", "fail:stall",
               "hello again"]
    record = _measure(stub, "--dataset-path", _write_prompts(tmp_path / "p.jsonl", prompts), "--timeout", "1")
    assert (record["completed"], record["failed"]) == (2, 5)
    per_request = record["per_request"]
    assert per_request["status"] == [200, 503, 200, 200, 200, 200, 200]
    errors = per_request["error"]
    assert errors[0] is None and errors[6] is None
    assert errors[1] == "HTTP 503: overloaded" and errors[2] == "stream error: device failure"
    assert errors[3].startswith("ClientPayloadError")  # the chunked body cut short
    assert errors[4] == "the stream ended before data: [DONE]" and errors[5] == "timed out after 1 s"
    assert record["errors"] == {error: 1 for error in errors[1:6]}
    assert record["total_output_tokens"] == 2 * 3 and record["total_prompt_tokens"] == 1 + 2  # from usage
    assert all(body["ignore_eos"] is False for body in stub.bodies)  # a prompt file honours EOS


def test_a_prompt_file_replaces_the_synthetic_dataset(stub, tmp_path):
    path = _write_prompts(tmp_path / "p.jsonl", ["hello"])
    for option in (["--dataset", "chat"], ["--input-len", "4"]):
        with pytest.raises(ValueError, match="--dataset-path replaces"):
            _measure(stub, "--dataset-path", path, *option)
    assert stub.bodies == []


def test_a_failed_test_request_stops_the_run(stub, tmp_path, capsys):
    path = _write_prompts(tmp_path / "p.jsonl", ["fail:503", "hello"])
    assert serve.run(_args(stub, "--dataset-path", path)) == 1
    assert "the test request" in capsys.readouterr().err and len(stub.bodies) == 1


def test_an_unreachable_server_is_reported():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = build_parser().parse_args(["bench", "serve", "--port", str(port), "--model-config", CONFIG])
    assert serve.run(args) == 1


def test_json_holds_the_summary_the_requests_and_the_command(stub, tmp_path, capsys):
    path = tmp_path / "serve.json"
    assert main(["bench", "serve", "--base-url", stub.url, "--model-config", CONFIG, "--num-prompts", "3",
                 "--input-len", "4", "--output-len", "3", "--max-concurrency", "3", "--api-key", "secret",
                 "--temperature", "0", "--disable-tqdm", "--output-json", str(path)]) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "serve"
    (record,) = payload["results"]
    assert record["dataset"] == "random" and record["total_output_tokens"] == 3 * 3
    for stat in ("mean", "median", "std", "p99"):
        assert {f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2e")} <= set(record)
    assert all(len(values) == 3 for values in record["per_request"].values())
    assert record["settings"]["request_rate"] == "inf" and record["settings"]["temperature"] == 0.0
    assert record["env"]["command"].startswith("pjllm bench serve --base-url")
    assert "--api-key '***'" in record["env"]["command"] and "secret" not in path.read_text()
    assert set(stub.authorization) == {"Bearer secret"}


def test_prompt_files_are_validated(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": [5, 6], "max_tokens": 7}\n\n{"prompt": "hi"}\n')
    requests = serve.read_prompt_file(str(path), default_output_len=9)
    assert [(r.prompt, r.output_len, r.prompt_len) for r in requests] == [([5, 6], 7, 2), ("hi", 9, None)]
    assert len(serve.read_prompt_file(str(path), num_prompts=1)) == 1
    with pytest.raises(ValueError, match="holds 2 prompts"):
        serve.read_prompt_file(str(path), num_prompts=3)
    for bad in ('{"prompt": ""}', '{"prompt": [1, "a"]}', '{"prompt": "x", "output_len": 0}', "[1]", "{"):
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match="p.jsonl:1"):
            serve.read_prompt_file(str(path))


def test_server_sent_events_are_split_by_blank_lines():
    events = ServerSentEvents()
    lines = [b": comment\n", b'data: {"a": 1}\n', b"\n", b"event: x\r\n", b"data:first\r\n",
             b"data: second\r\n", b"\r\n", b"\n", b"data:\n", b"\n", b"data: [DONE]", b""]
    assert [data for line in lines if (data := events.feed(line)) is not None] == [
        b'{"a": 1}', b"first\nsecond", b"", b"[DONE]"]  # the last event ends with the stream


def test_events_split_across_reads_or_ending_in_crlf_are_read(stub, tmp_path):
    # split: every event sent in pieces of 7 bytes, each piece its own write a moment apart;
    # crlf: every line ending CRLF, several events in one write.
    prompts = ["framing:split", "framing:crlf", "framing:split"]
    record = _measure(stub, "--dataset-path", _write_prompts(tmp_path / "p.jsonl", prompts, output_len=4))
    assert (record["completed"], record["failed"]) == (3, 0)
    per_request = record["per_request"]
    assert per_request["output_tokens"] == [4] * 3 and per_request["prompt_tokens"] == [1] * 3
    assert all(len(itls) == 3 for itls in per_request["itl_s"])
