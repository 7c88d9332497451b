"""Building the app from a loaded model, and running uvicorn in a background thread."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time

from rarefy.engine.async_engine import AsyncEngine
from rarefy.engine.llm_engine import EngineOptions, LLMEngine
from rarefy.errors import RarefyError


def served_model_name(source: str) -> str:
    """The model id clients send: the checkpoint's directory or file name, without a
    .gguf suffix and a quantization tag (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct)."""
    name = os.path.basename(os.path.normpath(str(source)))
    if name.endswith(".gguf"):
        name = name[:-5]
        stem, dot, tag = name.rpartition(".")
        if dot and tag[:1] in ("Q", "q", "F", "f", "B", "b", "I", "i"):
            name = stem
    return name


def build_server(loaded, options: EngineOptions | None = None, model_name: str | None = None,
                 api_key: str | None = None):
    """The FastAPI app serving `loaded` (rarefy.models.loader.load_model's result) through a
    new engine thread; the engine stops when the app shuts down."""
    from rarefy.server.api import create_app
    engine = AsyncEngine(LLMEngine(loaded.model, loaded.tokenizer, options))
    return create_app(engine, loaded.tokenizer, model_name or served_model_name(loaded.source), api_key)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RarefyError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)  # connections wait in the backlog until uvicorn serves them
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """uvicorn serving `app` from a background thread; port 0 picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn
        self.app, self.host = app, host
        self.sock = bind_socket(host, port)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="rarefy-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped during start-up")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
