"""Compiled step programs kept on disk, so that a restart neither traces nor lowers them.

JAX's persistent compilation cache spares a restart XLA's compile, but its key is a digest of
the lowered module, so every program must still be traced and lowered first (Python, holding
the GIL: ~0.3 s per step program of an 8B model, about a minute for the ~190 programs of the
GPU defaults). An `ExecutableStore` keeps each compiled program as a file
(`jax.experimental.serialize_executable`) under a digest of everything the program is made of
that is known without tracing it: the program's key and the abstract inputs it is lowered from
(shapes, dtypes, shardings and their devices), the configuration its function captured (given by
the caller as `context`), and the environment (`environment`): every file of the pjllm package,
the Python, jax and jaxlib versions, the backend, its platform version and its devices, the
host CPU on CPU, JAX's configuration and the XLA / JAX environment variables. A change to any of
them misses, and the program is lowered and compiled as if there were no store.

A program that JAX read from its own persistent cache instead of compiling it is stored only on
platforms where such an executable serializes whole (`RESERIALIZES_CACHED_PROGRAMS`: CUDA GPUs).
On CPU (jaxlib 0.11.2) it does not: it serializes without its compiled functions, and the copy
loaded from it fails at its first run ("Function ... not found"). So on CPU a program that XLA's
cache already held (from an earlier pjllm version, say) is not stored, and each start traces it
and reads it from XLA's cache as before; clearing the compilation cache folder lets the store
fill.

A file that cannot be read, fails its checksum or cannot be loaded is logged, deleted and built
again; nothing here raises into the step. Files are written to a temporary name and renamed, so a
reader never sees half a file, and processes sharing the folder at most build a program twice.

Nothing is evicted: the files of an older pjllm, configuration or jax stay until the folder is
cleared (each source change writes a new set, a few hundred KB a program for a small model).

Loading a file runs what it holds (a pickle, and XLA executables), exactly as JAX's own cache
does: the folder must be writable only by those whose programs you would run.

One process only: the engine turns the store off with several (`engine.executable_store_dir`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import platform
import re
import sys
import tempfile
import threading
import zlib
from typing import Any, Callable, Hashable, Mapping

import jax
import jaxlib
from jax.experimental import serialize_executable

logger = logging.getLogger(__name__)

# Whether an executable that JAX read from its persistent compilation cache serializes whole
# (and so may be stored), by platform (`platform_name`), as scripts/gpu_executable_store_check.py
# found with jax 0.11.2. CPU: no, its object code is left out. CUDA: yes (an H200, Pallas
# attention). Platforms not listed are not known, so such programs are not stored there.
RESERIALIZES_CACHED_PROGRAMS = {"cpu": False, "cuda": True}

# The first bytes of every file, then the SHA-256 of the rest: the entry, pickled and compressed
# (zlib level 6: a CPU forward of 2.3 MB takes 0.3 MB, 5 ms to decompress, 45 ms to compress on
# the store's own thread). A new layout takes a new magic.
_MAGIC = b"pjllm-executable-1\n"
_ZLIB_LEVEL = 6
_DIGEST_BYTES = 32
_SUFFIX = ".executable"


@functools.cache
def package_digest() -> str:
    """SHA-256 of every file of the pjllm package (sources, and data such as the kernels' tuning
    table), by path and contents; computed once per process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo")):
                continue
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def _host_cpu() -> str:
    """The host CPU's model and instruction set extensions (an XLA CPU executable is compiled
    for the CPU it was built on, so a home folder shared by other machines must miss)."""
    description = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    description.append(line.strip())
                elif not line.strip() and len(description) > 1:
                    break  # the first processor's lines describe them all
    except OSError:
        description.append(platform.processor())
    return hashlib.sha256("\n".join(description).encode()).hexdigest()


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# JAX options about caches, logs and dumps, which change no program (the engine sets the
# compilation cache's, and a test may turn it off).
_UNRELATED_JAX_OPTIONS = re.compile(
    r"jax_(enable_compilation_cache|compilation_cache_|persistent_cache_|raise_persistent_cache"
    r"|explain_cache_misses|log_compiles|logging_level|debug_log_modules|dump_ir_"
    r"|include_debug_info_in_dumps|pprint_|traceback_filtering|tracer_error_num_traceback"
    r"|compiler_detailed_logging)")


def _stable_repr(value: Any) -> str:
    """repr without object addresses (which differ in every process and would make every
    restart miss)."""
    return _ADDRESS.sub("", repr(value))


def environment() -> dict[str, str]:
    """What every program of this process depends on beyond its own inputs and configuration.
    JAX's thread-local configuration is not here: `ExecutableStore` reads it in the thread
    that would trace the program."""
    backend = jax.devices()[0].client
    env = {name: value for name, value in sorted(os.environ.items())
           if name.startswith(("XLA_", "JAX_", "LIBTPU_", "TPU_"))
           or name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_TF32_OVERRIDE")}
    return {
        "pjllm": package_digest(),
        "python": sys.version,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": backend.platform,
        "platform_version": backend.platform_version,
        "devices": repr([(d.id, d.device_kind, d.process_index) for d in jax.devices()]),
        "host_cpu": _host_cpu() if backend.platform == "cpu" else "",
        "jax_config": _stable_repr(sorted(
            (name, value) for name, value in jax.config.values.items()
            if not _UNRELATED_JAX_OPTIONS.match(name))),
        "env": repr(env),
    }


def _describe_sharding(sharding: Any) -> str:
    """A sharding with the ids of its devices, in order (a NamedSharding's repr names its mesh's
    axes, not its devices: two data-parallel replicas would look alike)."""
    if sharding is None:
        return "None"
    mesh = getattr(sharding, "mesh", None)
    devices = getattr(mesh, "devices", None)
    ids = ([d.id for d in devices.flat] if devices is not None
           else sorted(d.id for d in sharding.device_set))
    return f"{sharding!r} on {ids}"


def describe_abstract(tree: Any) -> str:
    """The structure, shapes, dtypes and shardings of a pytree of abstract arrays (and of the
    static values among its leaves), as text for a program's key."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [_stable_repr(treedef)]
    for leaf in leaves:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            parts.append(f"{tuple(leaf.shape)} {leaf.dtype} "
                         f"weak={getattr(leaf, 'weak_type', False)} "
                         f"{_describe_sharding(getattr(leaf, 'sharding', None))}")
        else:
            parts.append(_stable_repr(leaf))
    return "\n".join(parts)


def platform_name() -> str:
    """The default backend's platform, GPUs by their runtime ("cuda", "rocm"; JAX calls both
    "gpu" and tells them apart by the platform version, as here)."""
    device = jax.devices()[0]
    if device.platform in ("gpu", "cuda", "rocm"):
        version = device.client.platform_version.lower()
        return "cuda" if "cuda" in version else "rocm" if "rocm" in version else device.platform
    return device.platform


_compile_thread = threading.local()  # .read_from_xla_cache: the last compile of this thread's


def _note_cache_hit(event: str, **kwargs: Any) -> None:
    """jax.monitoring listener: JAX records this event in the thread whose compile read its
    persistent compilation cache."""
    if event == "/jax/compilation_cache/cache_hits":
        _compile_thread.read_from_xla_cache = True


@functools.cache
def _listen_for_cache_hits() -> None:
    jax.monitoring.register_event_listener(_note_cache_hit)


def compile_noting_cache_hit(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, bool]:
    """`lowered.compile()`, and whether JAX read the executable from its persistent compilation
    cache rather than compiling it."""
    _listen_for_cache_hits()
    _compile_thread.read_from_xla_cache = False
    compiled = lowered.compile()
    return compiled, _compile_thread.read_from_xla_cache


class ExecutableStore:
    """Compiled programs of one family (one model runner's) in `directory`, one file each.

    `context` is everything the programs' functions captured (the configuration), as values
    with a stable repr; `signature(key)` is what the program of `key` is lowered from (its
    abstract inputs and static arguments), described by `describe_abstract`. `describe(key)`
    names a program in logs.
    """

    def __init__(self, directory: str, context: Mapping[str, Any],
                 signature: Callable[[Hashable], Any], describe: Callable[[Hashable], str] = str):
        self.directory = directory
        self._signature = signature
        self._describe = describe
        self._identity = _stable_repr((sorted(environment().items()), sorted(
            (name, _stable_repr(value)) for name, value in context.items())))
        self._platform = platform_name()
        self._fingerprints: dict[Hashable, str] = {}
        self._lock = threading.Lock()
        self._warned_unserializable = False

    def fingerprint(self, key: Hashable) -> str:
        """The hex digest that names the program of `key`'s file (computed once per key, in the
        thread that first asks: the one that would otherwise trace it)."""
        with self._lock:
            known = self._fingerprints.get(key)
        if known is not None:
            return known
        from jax._src import config as jax_config  # its thread-local part has no public view

        text = "\n".join([self._identity, _stable_repr(jax_config.trace_context()), repr(key),
                          describe_abstract(self._signature(key))])
        fingerprint = hashlib.sha256(text.encode()).hexdigest()
        with self._lock:
            self._fingerprints[key] = fingerprint
        return fingerprint

    def path(self, key: Hashable) -> str:
        """The file of `key`'s program (which may not exist)."""
        return os.path.join(self.directory, self.fingerprint(key) + _SUFFIX)

    def contains(self, key: Hashable) -> bool:
        """Whether a file for `key` exists (it may still fail to load)."""
        return os.path.exists(self.path(key))

    def load(self, key: Hashable) -> jax.stages.Compiled | None:
        """The stored program of `key`, loaded onto its devices; None if there is none, or if
        its file is unusable (then it is deleted, for the program built instead to replace)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.warning("could not read the stored step program %s (%s): %s",
                           self._describe(key), path, error)
            return None
        try:
            entry = self._unpack(data, key)
            devices_by_id = {device.id: device for device in jax.devices()}
            devices = [devices_by_id[i] for i in entry["device_ids"]]
            return serialize_executable.deserialize_and_load(
                entry["payload"], entry["in_tree"], entry["out_tree"], backend=devices[0].client,
                execution_devices=devices)
        except Exception as error:  # any unusable file is built again, never an error
            logger.warning("the stored step program %s (%s) could not be loaded, so it is built "
                           "again: %s: %s", self._describe(key), path, type(error).__name__, error)
            self._discard(path)
            return None

    def _unpack(self, data: bytes, key: Hashable) -> dict[str, Any]:
        """The entry a file holds, after checking its magic, its checksum (before anything
        reads the rest: a damaged payload must not reach XLA) and that it is `key`'s program."""
        body = data[len(_MAGIC) + _DIGEST_BYTES:]
        if not data.startswith(_MAGIC):
            raise ValueError("not a stored program of this pjllm version")
        if hashlib.sha256(body).digest() != data[len(_MAGIC):len(_MAGIC) + _DIGEST_BYTES]:
            raise ValueError("checksum mismatch (a truncated or damaged file)")
        entry = pickle.loads(zlib.decompress(body))
        if entry.get("fingerprint") != self.fingerprint(key):
            raise ValueError("the file holds another program")
        return entry

    def compile(self, lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, bool]:
        """Compiles `lowered`; returns the program and whether it may be stored (`save`): not
        one read from XLA's cache on a platform where such programs serialize incomplete."""
        compiled, read_from_xla_cache = compile_noting_cache_hit(lowered)
        return compiled, (not read_from_xla_cache
                          or RESERIALIZES_CACHED_PROGRAMS.get(self._platform, False))

    def save(self, key: Hashable, compiled: jax.stages.Compiled) -> bool:
        """Writes `key`'s compiled program to its file (atomically); returns whether it did.
        A program that cannot be serialized is logged and skipped (it is built again on every
        start); a failed write is logged."""
        try:
            payload, in_tree, out_tree = serialize_executable.serialize(compiled)
            entry = {"fingerprint": self.fingerprint(key), "description": self._describe(key),
                     "device_ids": [d.id for d in compiled.runtime_executable().local_devices()],
                     "payload": payload, "in_tree": in_tree, "out_tree": out_tree}
            body = zlib.compress(pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL),
                                 _ZLIB_LEVEL)
        except Exception as error:
            log = logger.info if self._warned_unserializable else logger.warning
            self._warned_unserializable = True
            log("the step program %s cannot be stored (%s: %s); it will be built at every start",
                self._describe(key), type(error).__name__, error)
            return False
        path = self.path(key)
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_MAGIC + hashlib.sha256(body).digest() + body)
                os.replace(temporary, path)
            except BaseException:
                self._discard(temporary)
                raise
        except OSError as error:
            logger.warning("could not store the step program %s in %s: %s", self._describe(key),
                           self.directory, error)
            return False
        return True

    @staticmethod
    def _discard(path: str) -> None:
        try:
            os.remove(path)
        except OSError:
            pass
