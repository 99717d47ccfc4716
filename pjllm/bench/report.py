"""Output of every `pjllm bench` subcommand: a plain-text table on stdout and a JSON file.

A JSON file holds `{"benchmark": NAME, "results": [one record per backend], ...}`; each record
carries an `env` block (date, device, versions, command) so a number can always be traced back.
Only numpy and the standard library are imported here.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any, Callable, Sequence

Column = tuple[str, str, str]  # (record key, header, format spec such as ".1f")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Renders rows as an aligned text table; missing values print as `-`."""
    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, float) and spec:
            return format(value, spec)
        return str(value)

    header = [title for _, title, _ in columns]
    body = [[cell(row, key, spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> None:
    print(f"\n== {title} ==")
    print(format_table(rows, columns))
    sys.stdout.flush()


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Writes `payload` to `path` (parent folders created); does nothing when `path` is None."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
        f.write("\n")
    print(f"wrote {path}")


def read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _git_commit() -> str | None:
    """The checkout's short commit, with `-dirty` when tracked files differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty", "--abbrev=7"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(argv: Sequence[str] | None = None,
                device_info: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Date, host, versions and the command (`pjllm ARGV`); `device_info()` adds device fields.

    The device is asked for by the caller's backend only: touching jax's GPU backend from the
    torch benchmark would take GPU memory away from torch.
    """
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "python": platform.python_version(),
        "pjllm_commit": _git_commit(),
        "command": shlex.join(["pjllm", *argv]) if argv is not None else shlex.join(sys.argv),
    }
    if device_info is not None:
        env.update(device_info())
    return env


def jax_device_info() -> dict[str, Any]:
    """Device fields for the pjllm (jax) backend."""
    import jax

    device = jax.devices()[0]
    return {"jax": jax.__version__, "platform": device.platform, "device": device.device_kind,
            "device_count": jax.device_count()}
