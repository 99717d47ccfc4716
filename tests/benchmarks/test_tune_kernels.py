"""benchmarks/tune_kernels.py on CPU: tiny shapes in Pallas interpret mode, a table written."""

from __future__ import annotations

import json

from benchmarks import tune_kernels
from pjllm.kernels import paged_attention as pa


def test_tune_writes_a_table_that_select_config_reads(tmp_path):
    table_path = tmp_path / "tuning.json"
    out = tmp_path / "tune.json"
    status = tune_kernels.main(["--cases", "B4 ", "--reps", "1", "--table", str(table_path),
                                "--output-json", str(out)])
    assert status == 0
    table = json.loads(table_path.read_text())
    [(key, cfg)] = table["configs"].items()
    assert key == "decode:hq8:hkv2:d64:ps16:t4:n4:ctx80"
    assert {"block_rows", "block_kv", "num_warps", "num_stages", "kv_splits"} <= set(cfg)
    payload = json.loads(out.read_text())
    assert payload["entries"][key]["block_kv"] == cfg["block_kv"] and payload["written_to"] == str(table_path)
    [case] = payload["cases"]
    assert all("time_ms" in c or "error" in c for c in case["candidates"])
    assert all(c["resolved"]["kv_splits"] >= 1 for c in case["candidates"] if "resolved" in c)
    loaded = pa.load_tuning_table(str(table_path))
    assert pa.select_config(4, 4, 64, num_q_heads=8, num_kv_heads=2, page_size=16,
                            max_context=80, table=loaded) == pa.BlockConfig.from_json(cfg)


def test_small_shapes_leave_the_kernels_table_alone(tmp_path, monkeypatch, capsys):
    written = []
    monkeypatch.setattr(tune_kernels, "write_tuning_table", lambda *a: written.append(a))
    assert tune_kernels.main(["--cases", "B2 ", "--reps", "1", "--budget", "0"]) == 0
    assert written == [] and "proposed tuning table" in capsys.readouterr().out


def test_no_matching_case_is_an_error():
    assert tune_kernels.main(["--cases", "no such case"]) == 2
