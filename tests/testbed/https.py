"""A real HTTPS file server on 127.0.0.1 for download tests, with a few misbehaving routes.

Routes: /files/NAME serves a file; /redirect/NAME redirects to /files/NAME over https;
/redirect-http/NAME redirects to plain http; /truncated/NAME announces the full length but
closes the connection halfway (a fault a healthy server cannot be asked to produce, so this
route injects it on purpose).
"""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.testbed.pki import Pki


class _Handler(BaseHTTPRequestHandler):
    root: Path

    def log_message(self, format: str, *args: object) -> None:
        return

    def _file(self, name: str) -> Path | None:
        path = (self.root / name).resolve()
        return path if path.parent == self.root.resolve() and path.is_file() else None

    def do_GET(self) -> None:
        _, route, name = [*self.path.split("/", 2), "", ""][:3]
        if route == "redirect":
            self._redirect(f"https://{self.headers['Host']}/files/{name}")
            return
        if route == "redirect-http":
            self._redirect(f"http://{self.headers['Host']}/files/{name}")
            return
        path = self._file(name) if route in {"files", "truncated"} else None
        if path is None:
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data if route == "files" else data[: len(data) // 2])
        self.wfile.flush()
        if route == "truncated":
            self.close_connection = True

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


class HttpsFileServer:
    """Serves files from `root` over TLS with the test bed's CA-signed certificate."""

    def __init__(self, root: Path, pki: Pki) -> None:
        handler = type("Handler", (_Handler,), {"root": root})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = int(self.server.server_address[1])
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, route: str, name: str) -> str:
        return f"https://127.0.0.1:{self.port}/{route}/{name}"

    def __enter__(self) -> HttpsFileServer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
