"""The notebooks run top to bottom without errors (CPU): quickstart with the default model,
benchmarks on an empty results folder and on a folder with a result file and a broken one."""

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def _execute(name: str, timeout: int = 300) -> None:
    """Runs every cell in a fresh kernel (the notebook's folder as working directory); a cell
    that raises fails the test with nbclient's CellExecutionError."""
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()


def test_quickstart_notebook_runs():
    _execute("quickstart.ipynb")


def test_benchmarks_notebook_handles_empty_and_partial_results(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PJLLM_BENCH_RESULTS", str(tmp_path / "missing"))
    _execute("benchmarks.ipynb")
    (tmp_path / "broken.json").write_text("{not json")
    record = {"backend": "pjllm", "model": "m/config.json", "dataset": "chat", "num_prompts": 4,
              "output_tokens_per_s": 10.0, "settings": {"max_num_seqs": 8}}
    (tmp_path / "tp.json").write_text(json.dumps({"benchmark": "throughput", "results": [record]}))
    monkeypatch.setenv("PJLLM_BENCH_RESULTS", str(tmp_path))
    _execute("benchmarks.ipynb")
