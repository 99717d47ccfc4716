"""Starting test servers: a free localhost port, and waiting until a server answers /health."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import time

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, processes: list[subprocess.Popen], logs: list[pathlib.Path],
                       timeout_s: float) -> None:
    """Returns once `url`/health answers 200. Raises AssertionError, with the tail of the log
    of the process concerned, when one of `processes` has exited or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        for process, log in zip(processes, logs):
            assert process.poll() is None, (f"exited with {process.returncode}:\n"
                                            f"{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"no answer in {timeout_s} s:\n{logs[0].read_text()[-3000:]}"
        time.sleep(0.5)
