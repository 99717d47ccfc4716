"""What the package holds: the engine and the `pjllm bench` commands a user runs, nothing that needs
torch, no tuner and no profiler. Those tools live beside it in benchmarks/ and import from it,
never the other way round; a non-editable install works without them."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

from pjllm.entrypoints.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pjllm"
TOOL_MODULES = {"hf_backend", "compare_hf", "tune_kernels", "profile_kernels", "device_profile"}
TOOL_OPTIONS = {"--backend", "--hf-cb-config", "--hf-attn-implementation", "--profile-dir", "--tune",
                "--tune-budget", "--tune-output", "--no-profile"}
FORBIDDEN_IMPORTS = ("torch", "benchmarks")    # module roots
FORBIDDEN_ATTRIBUTES = ("torch.", "jax.profiler")


def _dotted_name(node: ast.AST) -> str:
    """`a.b.c` for an attribute chain on a plain name, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def _violations(path: pathlib.Path) -> list[str]:
    where = path.relative_to(ROOT)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # the module and what it gives
            names = [node.module or "", *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            names = []
        for name in names:
            if (name.split(".")[0] in FORBIDDEN_IMPORTS or name.split(".")[-1] in TOOL_MODULES
                    or f"{name}.".startswith(FORBIDDEN_ATTRIBUTES)):
                found.append(f"{where}:{node.lineno} imports {name}")
        if isinstance(node, ast.Attribute) and _dotted_name(node).startswith(FORBIDDEN_ATTRIBUTES):
            found.append(f"{where}:{node.lineno} uses {_dotted_name(node)}")
        # importlib.import_module("torch"), find_spec("torch"): torch named as a string
        if isinstance(node, ast.Constant) and node.value in FORBIDDEN_IMPORTS:
            found.append(f"{where}:{node.lineno} names {node.value!r}")
    return found


def test_package_uses_neither_torch_nor_a_profiler_nor_the_tools():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20
    assert [v for path in sources for v in _violations(path)] == []
    assert {path.stem for path in sources} & TOOL_MODULES == set()


def test_bench_commands_offer_no_tool_options():
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bench = subcommands.choices["bench"]
    bench_subcommands = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    assert set(bench_subcommands.choices) == {"throughput", "latency", "serve", "startup", "parity", "kernels"}
    for name, parser in bench_subcommands.choices.items():
        options = {option for action in parser._actions for option in action.option_strings}
        assert options & TOOL_OPTIONS == set(), name


def test_installed_wheel_runs_pjllm_bench_help(tmp_path):
    """`pip install .` (not editable) into a folder; its `pjllm bench --help` runs from outside
    the repository, importing the installed copy."""
    source = tmp_path / "source"     # a clean copy: setuptools writes build/ and *.egg-info beside it
    shutil.copytree(PACKAGE, source / "pjllm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site)]
    if importlib.util.find_spec("setuptools") is not None:
        install.append("--no-build-isolation")  # else pip fetches the build backend from PyPI
    completed = subprocess.run([*install, str(source)], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (site / "pjllm" / "kernels" / "paged_attention_tuning.json").is_file()
    assert not (site / "benchmarks").exists()
    assert {path.stem for path in (site / "pjllm").rglob("*.py")} & TOOL_MODULES == set()

    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    where = subprocess.run([sys.executable, "-c", "import pjllm; print(pjllm.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "pjllm" / "__init__.py"), where.stderr[-3000:]
    for argv, expected in ((["bench", "--help"], "throughput,latency,serve,startup,parity,kernels"),
                           (["bench", "throughput", "--help"], "--dataset")):
        completed = subprocess.run([str(site / "bin" / "pjllm"), *argv], cwd=tmp_path, env=env,
                                   capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert expected in completed.stdout
