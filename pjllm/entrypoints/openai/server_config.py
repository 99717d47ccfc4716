"""`pjllm serve`'s own settings, apart from the server so that the CLI can list them without
importing FastAPI (every `pjllm` command builds the serve parser)."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass
class ServerConfig:
    """The server's own settings (the engine's are EngineConfig's)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    # The model id clients name; None: the model argument as given (as vLLM).
    served_model_name: str | None = None
    # Sequences allowed to wait for a place in the batch; past it requests get 503.
    max_waiting_requests: int = 4096
    # On SIGTERM, how long running requests may take to finish before they are aborted.
    shutdown_timeout: float = 30.0
    chat_template: str | None = None  # a Jinja template file overriding the tokenizer's
    log_stats_interval: float = 5.0  # seconds between stats log lines; 0: none

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535]; got {self.port!r}")
        if not isinstance(self.max_waiting_requests, int) or self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be an integer >= 1; got {self.max_waiting_requests!r}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0; got {self.shutdown_timeout!r}")
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            raise ValueError(f"chat_template file {self.chat_template!r} does not exist")
