"""A loopback HTTPS server for issuer documents (what a bucket or CDN does in production)."""

from __future__ import annotations

import functools
import http.server
import ssl
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from hsm_keys.local.pki import LocalPki


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {  # noqa: RUF012 - overrides the base class's attribute of the same shape
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        "": "application/json",
        ".json": "application/json",
    }

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def list_directory(self, path: Any) -> None:
        self.send_error(404, "Not Found")


class LoopbackIssuerServer:
    """Serves ``root`` over HTTPS on 127.0.0.1 with the PKI's leaf + intermediate chain."""

    def __init__(self, root: str | Path, pki: LocalPki, *, port: int = 0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(pki.chain_file, pki.key_file)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> LoopbackIssuerServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="issuer-https", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackIssuerServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
