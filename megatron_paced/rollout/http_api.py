"""The rollout server's HTTP layer: routing, the key check before a body is read, bounded
bodies and connections, JSON and plain-text answers, a log line per request.

:func:`make_handler` serves a :class:`~megatron_paced.rollout.service.RolloutService`;
:class:`BoundedHTTPServer` caps the requests in flight. The trust model is in
``docs/security.md``; the endpoints in :mod:`megatron_paced.rollout.serve`.

Usage::

    server = BoundedHTTPServer(("127.0.0.1", 30000), make_handler(service, api_key), 16)
    server.serve_forever()
"""

from __future__ import annotations

import hmac
import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from megatron_paced.rollout.requests import RequestError, TextAnswer

if TYPE_CHECKING:
    from megatron_paced.rollout.service import RolloutService

API_KEY_ENV = "MEGATRON_PACED_API_KEY"
PARENT_PID_ENV = "MEGATRON_PACED_PARENT_PID"  # set by the trainer that launches the server
WEIGHT_ENDPOINTS = {"/update_weights_from_disk", "/update_weights_from_tensor",
                    "/pause_generation", "/continue_generation",
                    "/update_weight_version", "/release_memory_occupation",
                    "/resume_memory_occupation", "/init_weights_update_group",
                    "/update_weights_from_distributed", "/destroy_weights_update_group",
                    "/begin_weight_update", "/end_weight_update"}
OPEN_ENDPOINTS = {"/health"}  # answered without a key even when the server has one
# The methods SGLang's routes take (entrypoints/http_server.py); any other is its 405.
GET_ONLY = {"/health", "/health_generate", "/ready", "/model_info", "/get_model_info",
            "/server_info", "/get_server_info"}
GET_OR_POST = {"/flush_cache", "/release_memory_occupation", "/resume_memory_occupation"}
POST_OR_PUT = {"/generate"}


def method_allowed(path: str, method: str) -> bool:
    """Whether SGLang's route for ``path`` takes ``method`` (unknown paths: their 404)."""
    if path in GET_ONLY:
        return method == "GET"
    if path in GET_OR_POST:
        return method in ("GET", "POST")
    if path in POST_OR_PUT:
        return method in ("POST", "PUT")
    return method == "POST" or path not in WEIGHT_ENDPOINTS  # the other routes take POST


def make_handler(service: "RolloutService", api_key: str | None):
    limits = service.limits

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = limits.socket_timeout_s  # socketserver sets it on the connection

        def log_message(self, format, *args):  # keep test output quiet
            pass

        def _reply(self, status: int, payload=None) -> None:
            if isinstance(payload, TextAnswer):  # SGLang's Response(content=...): no type
                status, data, kind = payload.status, payload.text.encode(), None
            else:
                data = b"" if payload is None else json.dumps(payload).encode()
                kind = "application/json"
            path = self.path.split("?", 1)[0]
            if not path.startswith("/health"):  # a line per request (the trainer's log file)
                print(f"{self.command} {path[:100]} {status}", file=sys.stderr, flush=True)
            self.send_response(status)
            if kind:
                self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            if status >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            text = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding"):
                raise RequestError(411, "chunked bodies are not accepted: send Content-Length")
            if text is None or text.strip() == "":
                return {}
            if not text.strip().isdigit():
                raise RequestError(400, f"Content-Length {text[:30]!r} is not a non-negative "
                                        "integer")
            length = int(text)
            if length > limits.max_body_bytes:
                raise RequestError(413, f"body of {length} bytes; at most "
                                        f"{limits.max_body_bytes} (--max-body-mb)")
            if not length:
                return {}
            raw = self.rfile.read(length)
            if len(raw) != length:
                raise RequestError(400, "the body ended before Content-Length bytes")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                raise RequestError(400, f"body is not JSON: {getattr(err, 'msg', err)}") \
                    from None
            if not isinstance(body, dict):
                raise RequestError(400, "body must be a JSON object")
            return body

        def _authorized(self) -> bool:
            given = self.headers.get("Authorization") or ""
            return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

        def do_GET(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        def do_PUT(self) -> None:
            self._dispatch()

        def _dispatch(self) -> None:
            from megatron_paced.compat import cpu_compat_in_this_thread

            with cpu_compat_in_this_thread():
                self._route()

        def _check_access(self, path: str) -> None:
            """Before the body is read: a key for everything but /health when the server has
            one; no weight or memory control at all when it has none."""
            if path in OPEN_ENDPOINTS:
                return
            if api_key is None:
                if path in WEIGHT_ENDPOINTS:
                    raise RequestError(403, f"{path} is off: this server has no key (set "
                                            f"{API_KEY_ENV} or --api-key-file to enable "
                                            "weight updates)")
                return
            if not self._authorized():
                raise RequestError(401, "this server needs Authorization: Bearer <api key>")

        def _route(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                self._check_access(path)  # (SGLang's key middleware runs before routing)
                if not method_allowed(path, self.command):
                    raise RequestError(405, "Method Not Allowed")
                body = self._body()
                if path in ("/health", "/health_generate", "/ready"):
                    return self._reply(200 if not service.released or path == "/health" else 503)
                routes = {
                    "/generate": service.generate,
                    "/update_weights_from_disk": service.update_weights_from_disk,
                    "/update_weights_from_tensor": service.update_weights_from_tensor,
                    "/update_weight_version": service.update_weight_version,
                    "/init_weights_update_group": service.init_weights_update_group,
                    "/update_weights_from_distributed": service.update_weights_from_distributed,
                    "/destroy_weights_update_group": service.destroy_weights_update_group,
                    "/pause_generation": service.pause_generation,
                    "/continue_generation": service.continue_generation,
                    "/flush_cache": service.flush_cache,
                    "/begin_weight_update": service.begin_weight_update,
                    "/end_weight_update": service.end_weight_update,
                }
                if path in routes:
                    return self._reply(200, routes[path](body))
                if path in ("/get_model_info", "/model_info"):
                    return self._reply(200, service.model_info())
                if path in ("/server_info", "/get_server_info"):
                    return self._reply(200, service.server_info())
                if path == "/release_memory_occupation":
                    service.released = True
                    return self._reply(200, {})
                if path == "/resume_memory_occupation":
                    service.released = False
                    return self._reply(200, {})
                raise RequestError(404, f"no endpoint {path[:100]}")
            except RequestError as err:
                self._reply(err.status, {"error": {"message": str(err), "code": err.status}})
            except (OSError, TimeoutError):  # the client went away or stalled: nothing to say
                self.close_connection = True
            except Exception:  # noqa: BLE001 - a bug: logged here, not shown to the caller
                traceback.print_exc()
                self._reply(500, {"error": {"message": "internal error (see the server log)",
                                            "code": 500}})

    return Handler


class BoundedHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with at most ``max_workers`` requests in flight; a connection
    beyond that gets a 503 at once instead of a thread."""

    daemon_threads = True

    def __init__(self, address, handler, max_workers: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_workers)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
