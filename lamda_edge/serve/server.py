"""Running the server: uvicorn over the app, a loopback default, and SIGTERM as a graceful drain that exits 0.

    SIGTERM ──> stop listening, answer 503 to new requests ──> in-flight requests finish (up to --grace) ──> the
    rest are cancelled after their token in progress ──> exit 0
"""

from __future__ import annotations

import ipaddress
import signal
import sys

from lamda_edge.errors import ConfigError, require
from lamda_edge.serve.app import ServeSettings, create_app
from lamda_edge.serve.engine import Engine


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(engine: Engine, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
                grace_s: float = 30.0, log_level: str = "info"):
    """A uvicorn server for `engine` (not started): `.run()` in the main thread, or `.serve()` on a loop."""
    uvicorn = require("uvicorn", "serve")
    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=max(grace_s, 1e-3),  # 0 would wait forever
                            server_header=False)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: drain first, then uvicorn's own shutdown
            app.state.service.drain()
            super().handle_exit(sig, frame)

    return Server(config)


def serve(engine: Engine, settings: ServeSettings, host: str, port: int, grace_s: float,
          log_level: str = "info") -> int:
    """Serve until SIGTERM or Ctrl-C; returns 0 after a drain."""
    if not is_loopback(host) and settings.api_key is None:
        print(f"warning: serving on {host}, which is not a loopback address, without an API key: anyone who can "
              "reach this port can use the model. Fix: --api-key KEY (or LAMDA_EDGE_API_KEY)", file=sys.stderr)
    server = make_server(engine, settings, host, port, grace_s, log_level)
    print(f"serving {settings.model_name} ({engine.kind}, {engine.onnx_file}) on http://{host}:{port}/v1: "
          f"{settings.concurrency} at a time, {settings.queue} queued, {settings.timeout_s:g} s deadline"
          f"{', API key required' if settings.api_key else ''}", file=sys.stderr, flush=True)
    # uvicorn re-raises the SIGTERM it drained on; this handler makes that the end of a clean exit (code 0)
    previous = signal.signal(signal.SIGTERM, lambda *_: print("drained; exiting", file=sys.stderr, flush=True))
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
        if exc.code:
            raise ConfigError(f"cannot serve on {host}:{port} (see the error above). Fix: pick a free --port, "
                              "or stop what listens there") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
