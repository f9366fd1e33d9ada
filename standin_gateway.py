"""A stand-in for the MKA1 gateway on loopback, for the tests, the benchmark and the offline demo.

    python standin_gateway.py                  # the demo: serve, run the CLI on a batch, stop
    python standin_gateway.py --serve          # only serve, until Ctrl-C; the key is demo-key
    python standin_gateway.py --serve --port 8080

It speaks the real contract (bearer token, X-On-Behalf-Of scoping, error envelopes,
X-Request-ID) for ``GET /api/v1/llm/batches/{id}`` and ``GET /api/v1/llm/files/{id}/content``,
with scripted batches and files (see Gateway), and breaks connections on request for the
tests. Standard library only; it runs on Python 3.6 and later.
"""

import argparse
import json
import os
import re
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple
from urllib.parse import unquote

DEMO_TOKEN = "demo-key"  # noqa: S105 - the stand-in's published demo key
PATH = "/api/v1/llm/batches/"
FILE_PATH = re.compile(r"/api/v1/llm/files/([^/?#]+)/content")
#: The progressing batch's states, one per poll: (status, completed, failed, total).
PROGRESS = [
    ("validating", 0, 0, 0),
    ("in_progress", 0, 0, 3),
    ("in_progress", 1, 0, 3),
    ("in_progress", 1, 1, 3),
    ("finalizing", 2, 1, 3),
    ("completed", 2, 1, 3),
]
#: The size of every line of ``file-large-<N>``, its newline included.
LINE_BYTES = 1024
#: The commands the demo runs, in turn, after ``python -m mka1_batches``.
DEMO_COMMANDS = [
    ["batch_progress", "--wait", "--poll-interval", "0.5"],
    ["batch_progress", "--results"],
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

# The order in which a scripted batch's requests finish: its files list them so, not in input order.
_FINISHED = ("request-3", "request-1", "request-2")
# The statuses that come with results: a cancelled or expired batch keeps what it finished.
_WITH_RESULTS = ("completed", "cancelled", "expired")
# A line of file-large-<N> is these two around a padding of "x"s.
_LARGE_HEAD = (
    b'{"id": "batch_req_%d", "custom_id": "request-%d", "response": {"status_code": 200, "request_id": "req_%d",'
    b' "body": {"object": "chat.completion", "model": "stand-in", "choices": [{"index": 0, "message":'
    b' {"role": "assistant", "content": "'
)
_LARGE_TAIL = b'"}, "finish_reason": "stop"}]}}, "error": null}\n'
_LINES_PER_WRITE = 256


def batch_json(
    batch_id: str, status: str = "completed", completed: int = 2, failed: int = 1, total: int = 3
) -> Dict[str, Any]:
    """The documented example with this id, status and counts, plus a field newer servers send.

    A completed, cancelled or expired batch names ``file-<batch_id>-output`` if some requests
    completed and ``file-<batch_id>-errors`` if some failed; other statuses name no file.
    """
    data = dict(DOCUMENTED_EXAMPLE, id=batch_id, status=status, max_concurrency=8)
    data["request_counts"] = {"total": total, "completed": completed, "failed": failed}
    done = status in _WITH_RESULTS
    data["output_file_id"] = f"file-{batch_id}-output" if done and completed else None
    data["error_file_id"] = f"file-{batch_id}-errors" if done and failed else None
    if status != "completed":
        data.update(finalizing_at=None, completed_at=None)
    if status == "cancelled":
        data.update(cancelling_at=1704067990, cancelled_at=1704068000)
    if status == "expired":
        data.update(expired_at=1704153600)
    if status == "failed":
        error = {"code": "invalid_json_line", "message": "Line 1 is not valid JSON.", "param": None, "line": 1}
        data.update(errors={"object": "list", "data": [error]}, failed_at=1704067230, in_progress_at=None)
    return data


def large_line(i: int) -> bytes:
    """Line ``i`` (from 1) of ``file-large-<N>``: a successful result, padded to LINE_BYTES."""
    return b"".join(_large_parts(i))


class _Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True  # a client that keeps its connection open does not hold up the exit


class Gateway:
    """The stand-in, served from a thread: ``with Gateway() as gw: gw.base_url``.

    Batches: ``batch_progress`` moves one state per poll (see PROGRESS) and
    ``batch_ratelimited`` answers 429 once, each counted per X-On-Behalf-Of scope;
    ``batch_failed`` has failed; ``batch_private`` exists only for ``user_123``;
    ``batch_status_<status>`` has that status; any other ``batch_*`` id is a completed batch
    with 2 requests completed and 1 failed; everything else is 404. Ids ``fault_<kind>``
    break the connection (see _fault). ``chaos`` makes every ``chaos_every``-th request one
    of those faults, in turn.

    Each client sees ``batch_progress`` progress: a scope that polls it again after it has
    sat at its end, unpolled, for ``restart_after`` seconds, starts over from its first
    state. A client that keeps polling, or asks for the results right after, sees it stay
    completed.

    Files (``GET /api/v1/llm/files/{id}/content``, JSONL, scoped like their batch):
    ``file-<batch_id>-output`` and ``file-<batch_id>-errors`` for the batches that name them
    (the output lists request-3 then request-1; the errors, request-2);
    ``file-large-<N>``, N lines of LINE_BYTES each (see large_line), made as they are sent;
    ``file-cut-<N>``, the same, but the first GET per scope closes the connection mid-line
    a little past half way; ``file-gzip-<N>``, the same lines gzip-encoded whatever the
    client accepts. Everything else is 404.
    """

    def __init__(
        self,
        chaos: Tuple[str, ...] = (),
        chaos_every: int = 0,
        drip: float = 0.2,
        port: int = 0,
        restart_after: float = 10.0,
    ):
        self.chaos = chaos
        self.chaos_every = chaos_every
        self.drip = drip
        self.restart_after = restart_after
        self.connections = 0
        self.requests: List[Dict[str, str]] = []
        self._polls: Dict[Tuple[Optional[str], str], Tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = _Server(("127.0.0.1", port), _handler(self))
        # serve_forever checks for shutdown every poll interval: 0.5 s by default, paid on every exit.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "Gateway":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def count(self, scope: Optional[str], key: str, cycle: int = 0) -> int:
        """How many times this scope has asked for this key, this time included.

        With ``cycle``, a count that has reached it starts again at 1 once the key has gone
        unasked for ``restart_after`` seconds.
        """
        now = time.monotonic()
        with self._lock:
            n, last = self._polls.get((scope, key), (0, now))
            if cycle and n >= cycle and now - last >= self.restart_after:
                n = 0
            self._polls[scope, key] = (n + 1, now)
            return n + 1

    def answer(self, batch_id: str, scope: Optional[str]) -> Tuple[int, Dict[str, Any], Dict[str, str]]:
        """The status, JSON body and extra headers for a GET of this batch."""
        if batch_id == "batch_progress":
            state = PROGRESS[min(self.count(scope, batch_id, len(PROGRESS)), len(PROGRESS)) - 1]
            return 200, batch_json(batch_id, *state), {}
        if batch_id == "batch_ratelimited" and self.count(scope, batch_id) == 1:
            return 429, {"error": "Rate limit exceeded"}, {"Retry-After": "1"}
        batch = self.final(batch_id, scope)
        if batch is None:
            return 404, {"error": {"message": "Batch not found", "details": {"batch_id": batch_id}}}, {}
        return 200, batch, {}

    def final(self, batch_id: str, scope: Optional[str]) -> Optional[Dict[str, Any]]:
        """The batch as it ends, or None where this scope cannot see it."""
        if not batch_id.startswith("batch_") or (batch_id == "batch_private" and scope != "user_123"):
            return None
        if batch_id == "batch_failed":
            return batch_json(batch_id, "failed", 0, 0, 0)
        if batch_id.startswith("batch_status_"):
            status = batch_id[len("batch_status_") :]
            counts = {"completed": (2, 1, 3), "failed": (0, 0, 0)}.get(status, (1, 0, 3))
            return batch_json(batch_id, status, *counts)
        return batch_json(batch_id)

    def content(self, file_id: str, scope: Optional[str]) -> Optional[Tuple[Iterable[bytes], int, Dict[str, str]]]:
        """The body's chunks, its full length and extra headers for a GET of this file, or None."""
        match = re.fullmatch(r"file-(large|cut|gzip)-([0-9]+)", file_id)
        if match:
            kind, lines = match.group(1), int(match.group(2))
            if kind == "gzip":
                compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # fast, in the gzip container
                data = b"".join([compressor.compress(chunk) for chunk in _large(lines)] + [compressor.flush()])
                return [data], len(data), {"Content-Encoding": "gzip"}
            length = lines * LINE_BYTES
            if kind == "cut" and self.count(scope, file_id) == 1:
                return _truncated(_large(lines), length // 2 + 100), length, {}
            return _large(lines), length, {}
        match = re.fullmatch(r"file-(.+)-(output|errors)", file_id)
        batch = self.final(match.group(1), scope) if match else None
        if batch is None or file_id not in (batch["output_file_id"], batch["error_file_id"]):
            return None
        completed, failed = batch["request_counts"]["completed"], batch["request_counts"]["failed"]
        if file_id == batch["output_file_id"]:
            data = b"".join(_result(custom_id, ok=True) for custom_id in _FINISHED[:completed])
        else:
            data = b"".join(_result(custom_id, ok=False) for custom_id in _FINISHED[completed : completed + failed])
        return [data], len(data), {}


def _result(custom_id: str, ok: bool) -> bytes:
    """One line of a scripted batch's output file (``ok``) or error file."""
    n = custom_id[len("request-") :]
    line: Dict[str, Any] = {"id": "batch_req_" + n, "custom_id": custom_id, "response": None, "error": None}
    if ok:
        answer = {"role": "assistant", "content": f"The answer to request {n}."}
        body = {
            "id": "chatcmpl-" + n,
            "object": "chat.completion",
            "created": 1704070800,
            "model": "stand-in",
            "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
        }
        line["response"] = {"status_code": 200, "request_id": "req_" + n, "body": body}
    else:
        line["error"] = {"code": "processing_error", "message": "The request could not be processed."}
    return json.dumps(line).encode() + b"\n"


def _large(lines: int) -> Iterator[bytes]:
    """``file-large-<lines>``, a few hundred lines per chunk, made as they are sent."""
    for start in range(1, lines + 1, _LINES_PER_WRITE):
        parts: List[bytes] = []
        for i in range(start, min(start + _LINES_PER_WRITE, lines + 1)):
            parts += _large_parts(i)  # one join per chunk, not two copies per line: twice as fast
        yield b"".join(parts)


def _large_parts(i: int) -> Tuple[bytes, bytes, bytes]:
    head = _LARGE_HEAD % (i, i, i)
    return head, b"x" * (LINE_BYTES - len(head) - len(_LARGE_TAIL)), _LARGE_TAIL


def _truncated(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of ``chunks``."""
    for chunk in chunks:
        if size <= 0:
            return
        yield chunk[:size]
        size -= len(chunk)


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
            file_path = FILE_PATH.fullmatch(self.path)
            scope = self.headers.get("X-On-Behalf-Of")
            if gateway.chaos_every and self.number % gateway.chaos_every == 0:
                self._fault(gateway.chaos[(self.number // gateway.chaos_every) % len(gateway.chaos)])
            elif not file_path and (not self.path.startswith(PATH) or "/" in self.path[len(PATH) :]):
                self._send(404, {"error": {"message": "no route", "details": None}})
            elif self.headers.get("Authorization") != "Bearer " + DEMO_TOKEN:
                self._send(401, {"error": {"message": "Invalid API key", "details": None}})
            elif file_path:
                file_id = unquote(file_path.group(1))
                found = gateway.content(file_id, scope)
                if found is None:
                    self._send(404, {"error": {"message": "File not found", "details": {"file_id": file_id}}})
                else:
                    self._stream(*found)
            elif batch_id.startswith("fault_"):
                self._fault(batch_id[len("fault_") :])
            else:
                self._send(*gateway.answer(batch_id, scope))

        def _head(self, status: int, headers: Dict[str, str]) -> bytes:
            items = {**headers, "X-Request-ID": f"{uuid.uuid4()}#{self.number}"}
            head = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}"]
            head += [f"{k}: {v}" for k, v in items.items()]
            return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

        def _send(self, status: int, body: Any, headers: Optional[Dict[str, str]] = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            items = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
            self.wfile.write(self._head(status, items) + data)
            self.wfile.flush()

        def _stream(self, chunks: Iterable[bytes], length: int, headers: Dict[str, str]) -> None:
            """A 200 with ``length`` bytes promised; if ``chunks`` hold fewer, the connection closes early."""
            items = {"Content-Type": "application/jsonl", "Content-Length": str(length), **headers}
            sent = 0
            try:
                self.wfile.write(self._head(200, items))
                for chunk in chunks:
                    self.wfile.write(chunk)
                    sent += len(chunk)
            except OSError:  # the client hung up mid-file, as a reader that stops early does
                sent = -1
            self.close_connection = sent != length

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


def demo(gateway: Gateway) -> int:
    """Run each of DEMO_COMMANDS against the gateway, showing it first; return the first failing exit code, or 0."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MKA1_API_KEY=DEMO_TOKEN, MKA1_BASE_URL=gateway.base_url)
    env.pop("MKA1_BEARER_AUTH", None)
    print(
        f"stand-in gateway on {gateway.base_url}, with MKA1_API_KEY={DEMO_TOKEN} MKA1_BASE_URL={gateway.base_url}",
        file=sys.stderr,
        flush=True,
    )
    for args in DEMO_COMMANDS:
        print("$ python -m mka1_batches " + " ".join(args), file=sys.stderr, flush=True)
        code = subprocess.run([sys.executable, "-m", "mka1_batches", *args], env=env, cwd=here).returncode
        if code:
            return code
    return 0


def serve(gateway: Gateway) -> int:
    """Serve until Ctrl-C, after saying how to reach the gateway."""
    print(f"stand-in gateway on {gateway.base_url}, until Ctrl-C. In another shell:")
    print(f"  export MKA1_BASE_URL={gateway.base_url} MKA1_API_KEY={DEMO_TOKEN}")
    for args in DEMO_COMMANDS:
        print("  python -m mka1_batches " + " ".join(args))
    print(f"batch_progress starts over once left at its end for {gateway.restart_after:g} s.", flush=True)
    threading.Event().wait()
    return 0  # not reached: only Ctrl-C ends the wait


def main(argv: Optional[List[str]] = None) -> int:
    commands = "\n".join("  python -m mka1_batches " + " ".join(args) for args in DEMO_COMMANDS)
    parser = argparse.ArgumentParser(
        prog="python standin_gateway.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A stand-in MKA1 gateway on 127.0.0.1, with scripted batches and their files.\n\n"
        "Without --serve, the demo: start the gateway, run these against it, stop:\n" + commands,
        epilog=f"The gateway takes the API key {DEMO_TOKEN!r}. Its scripted batches and files are listed"
        " in the docstring of standin_gateway.Gateway.",
    )
    parser.add_argument("--serve", action="store_true", help="only serve, until Ctrl-C")
    parser.add_argument("--port", type=int, default=0, metavar="N", help="the port to listen on (default: a free one)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    try:
        gateway = Gateway(port=args.port)
    except OSError as exc:
        print(f"error: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    with gateway:
        try:
            return serve(gateway) if args.serve else demo(gateway)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0 if args.serve else 130


if __name__ == "__main__":
    raise SystemExit(main())
