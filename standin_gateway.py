"""A stand-in for the MKA1 gateway on loopback, for the tests and the offline demo.

    python standin_gateway.py           # the demo: serve, run `python -m mka1_batches --wait`, stop
    python standin_gateway.py --serve   # only serve, until Ctrl-C

It speaks the real contract (bearer token, X-On-Behalf-Of scoping, error envelopes,
X-Request-ID) with scripted batches, and breaks connections on request for the tests.
Standard library only.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote

DEMO_TOKEN = "demo-key"  # noqa: S105 - the stand-in's published demo key
PATH = "/api/v1/llm/batches/"
#: The progressing batch's states, one per poll: (status, completed, failed, total).
PROGRESS = [
    ("validating", 0, 0, 0),
    ("in_progress", 0, 0, 3),
    ("in_progress", 1, 0, 3),
    ("in_progress", 2, 0, 3),
    ("finalizing", 3, 0, 3),
    ("completed", 3, 0, 3),
]


#: The example response in MKA1's API reference, as published.
DOCUMENTED_EXAMPLE: Dict[str, Any] = {
    "id": "batch_aa87e2b1112a455b8deabed784372198",
    "object": "batch",
    "endpoint": "/v1/chat/completions",
    "errors": None,
    "input_file_id": "file_abc123",
    "completion_window": "24h",
    "status": "completed",
    "output_file_id": "file_def456",
    "error_file_id": None,
    "created_at": 1704067200,
    "in_progress_at": 1704067260,
    "expires_at": 1704153600,
    "finalizing_at": 1704070800,
    "completed_at": 1704070860,
    "failed_at": None,
    "expired_at": None,
    "cancelling_at": None,
    "cancelled_at": None,
    "request_counts": {"total": 3, "completed": 3, "failed": 0},
    "metadata": {"description": "evaluation job"},
}


def batch_json(
    batch_id: str, status: str = "completed", completed: int = 3, failed: int = 0, total: int = 3
) -> Dict[str, Any]:
    """The documented example with this id, status and counts, plus a field newer servers send."""
    data = dict(DOCUMENTED_EXAMPLE, id=batch_id, status=status, max_concurrency=8)
    data["request_counts"] = {"total": total, "completed": completed, "failed": failed}
    if status != "completed":
        data.update(output_file_id=None, finalizing_at=None, completed_at=None)
    if status == "failed":
        error = {"code": "invalid_json_line", "message": "Line 1 is not valid JSON.", "param": None, "line": 1}
        data.update(errors={"object": "list", "data": [error]}, failed_at=1704067230, in_progress_at=None)
    return data


class Gateway:
    """The stand-in, served from a thread: ``with Gateway() as gw: gw.base_url``.

    Scripted ids: ``batch_progress`` moves one state per poll (see PROGRESS) and
    ``batch_ratelimited`` answers 429 once, each counted per X-On-Behalf-Of scope;
    ``batch_failed`` has failed; ``batch_private`` exists only for ``user_123``;
    ``batch_status_<status>`` has that status; any other ``batch_*`` id is a completed
    batch; everything else is 404. Ids ``fault_<kind>`` break the connection (see _fault).
    ``chaos`` makes every ``chaos_every``-th request one of those faults, in turn.
    """

    def __init__(self, chaos: Tuple[str, ...] = (), chaos_every: int = 0, drip: float = 0.2):
        self.chaos = chaos
        self.chaos_every = chaos_every
        self.drip = drip
        self.connections = 0
        self.requests: List[Dict[str, str]] = []
        self._polls: Dict[Tuple[Optional[str], str], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Gateway:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def count(self, scope: Optional[str], batch_id: str) -> int:
        """How many times this scope has asked for this id, this time included."""
        with self._lock:
            n = self._polls[scope, batch_id] = self._polls.get((scope, batch_id), 0) + 1
            return n

    def answer(self, batch_id: str, scope: Optional[str]) -> Tuple[int, Dict[str, Any], Dict[str, str]]:
        """The status, JSON body and extra headers for a GET of this batch."""
        if batch_id == "batch_progress":
            status, completed, failed, total = PROGRESS[min(self.count(scope, batch_id), len(PROGRESS)) - 1]
            return 200, batch_json(batch_id, status, completed, failed, total), {}
        if batch_id == "batch_ratelimited" and self.count(scope, batch_id) == 1:
            return 429, {"error": "Rate limit exceeded"}, {"Retry-After": "1"}
        if batch_id == "batch_failed":
            return 200, batch_json(batch_id, "failed", 0, 0, 0), {}
        if batch_id.startswith("batch_status_"):
            return 200, batch_json(batch_id, batch_id[len("batch_status_") :]), {}
        if batch_id.startswith("batch_") and (batch_id != "batch_private" or scope == "user_123"):
            return 200, batch_json(batch_id), {}
        return 404, {"error": {"message": "Batch not found", "details": {"batch_id": batch_id}}}, {}


def _handler(gateway: Gateway) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real gateway
        server_version = "kong/3.4"

        def setup(self) -> None:
            super().setup()
            # Head and body go out in one write each; without this, delayed ACKs add 40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with gateway._lock:
                gateway.connections += 1

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            with gateway._lock:
                gateway.requests.append({"path": self.path, **self.headers})
                self.number = len(gateway.requests)
            batch_id = unquote(self.path[len(PATH) :])
            if gateway.chaos_every and self.number % gateway.chaos_every == 0:
                self._fault(gateway.chaos[(self.number // gateway.chaos_every) % len(gateway.chaos)])
            elif not self.path.startswith(PATH) or "/" in self.path[len(PATH) :]:
                self._send(404, {"error": {"message": "no route", "details": None}})
            elif self.headers.get("Authorization") != "Bearer " + DEMO_TOKEN:
                self._send(401, {"error": {"message": "Invalid API key", "details": None}})
            elif batch_id.startswith("fault_"):
                self._fault(batch_id[len("fault_") :])
            else:
                self._send(*gateway.answer(batch_id, self.headers.get("X-On-Behalf-Of")))

        def _send(self, status: int, body: Any, headers: Optional[Dict[str, str]] = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            items = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
            items["X-Request-ID"] = f"{uuid.uuid4()}#{self.number}"
            head = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}"]
            head += [f"{k}: {v}" for k, v in items.items()]
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
            self.wfile.flush()

        def _fault(self, kind: str) -> None:
            """Break this exchange the way ``kind`` says; the tests name these ids."""
            body = json.dumps(batch_json("batch_" + kind)).encode()
            if kind == "429":
                self._send(429, {"error": "Rate limit exceeded"}, {"Retry-After": "0"})
            elif kind == "503":
                self._send(503, b"<html><body><h1>503 Service Unavailable</h1></body></html>", {"Retry-After": "0"})
            elif kind == "drip":  # the whole body, one byte at a time, each just inside a read timeout
                self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
                for byte in body:
                    if gateway._stop.wait(gateway.drip):
                        break
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            elif kind == "hang":  # read the request, never answer
                gateway._stop.wait(30)
            elif kind == "short":  # promise more than is sent, then close
                self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body) + 100}\r\n\r\n".encode() + body)
            elif kind == "reset_mid":  # half the body, then a reset
                self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:40])
                self.wfile.flush()
                time.sleep(0.05)
                self._reset()
            elif kind == "reset":  # a reset before any response
                self._reset()
            # "drop", and every fault above but the status ones: close without another word.
            self.close_connection = kind not in ("429", "503")

        def _reset(self) -> None:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    return Handler


def demo() -> int:
    """Serve, run the CLI with --wait on the progressing batch, stop; return its exit code."""
    here = os.path.dirname(os.path.abspath(__file__))
    with Gateway() as gateway:
        print(
            f"stand-in gateway on {gateway.base_url}; running: python -m mka1_batches batch_progress --wait",
            file=sys.stderr,
            flush=True,
        )
        env = dict(os.environ, MKA1_API_KEY=DEMO_TOKEN, MKA1_BASE_URL=gateway.base_url)
        env.pop("MKA1_BEARER_AUTH", None)
        command = [sys.executable, "-m", "mka1_batches", "batch_progress", "--wait", "--poll-interval", "0.5"]
        return subprocess.run(command, env=env, cwd=here).returncode


def main() -> int:
    if sys.argv[1:] == ["--serve"]:
        with Gateway() as gateway:
            print(f"serving on {gateway.base_url} (token {DEMO_TOKEN!r}); Ctrl-C stops", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                return 0
    return demo()


if __name__ == "__main__":
    raise SystemExit(main())
