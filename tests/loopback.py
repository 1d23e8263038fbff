"""Servers on a free loopback port in a daemon thread, for tests.

``serve(target)`` runs either our teacher server (a FastAPI app, through
``stillroom.teachers.running_server.RunningServer``) or a hand-written ``http.server`` handler class (the fakes that
inject faults or answer junk); either way the result has ``url`` (the base URL, ending in ``/v1``) and
``stop()``, and is a context manager. The ``loopback`` fixture (tests/conftest.py) stops what it starts
after the test; module-scoped fixtures use ``with serve(...)``. ``teacher_app`` is our server for a tiny model.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HandlerServer:
    """``handler`` served by a ThreadingHTTPServer on 127.0.0.1 in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        # A short poll interval: shutdown() waits for the serving loop's next poll (0.5 s by default).
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._stopped = False

    def stop(self) -> None:
        """Shut the server down (again: nothing happens); later requests are refused."""
        if not self._stopped:
            self._stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self) -> "HandlerServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(target):
    """``target`` (a FastAPI app or a BaseHTTPRequestHandler subclass) served on a free loopback port."""
    if isinstance(target, type) and issubclass(target, BaseHTTPRequestHandler):
        return HandlerServer(target)
    from stillroom.teachers.running_server import RunningServer

    return RunningServer(target)


def free_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teacher_service(model, tok, *, model_name: str = "tiny", **kw):
    """Our teacher server's model work for a (tiny) model, served under ``model_name``; ``kw``: TeacherService's."""
    from stillroom.teachers.server import TeacherService

    return TeacherService(model, tok, model_name=model_name, **kw)


def teacher_app(model, tok, *, api_key: str | None = None, **kw):
    """Our teacher server (the FastAPI app) for ``model`` served as "tiny"; ``kw``: TeacherService's options."""
    from stillroom.teachers.server import create_app

    return create_app(teacher_service(model, tok, **kw), api_key=api_key)
