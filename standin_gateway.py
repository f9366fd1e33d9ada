"""A stand-in for the MKA1 gateway on loopback, for the tests, the benchmark and the offline demo.

    python standin_gateway.py                  # the demo: serve, run the CLI on a batch, stop
    python standin_gateway.py --serve          # only serve, until Ctrl-C; the key is demo-key
    python standin_gateway.py --serve --port 8080

It speaks the real contract (bearer token, X-On-Behalf-Of scoping, error envelopes,
X-Request-ID, a Date header) for a batch's whole life: upload a file (``POST
/api/v1/llm/files``), list and get files, create a batch (``POST /api/v1/llm/batches``),
list, get and cancel batches, and read a file's content. It has scripted batches and files
(see Gateway), and breaks connections and writes on request for the tests. Standard library
only; it runs on Python 3.6 and later.
"""

import argparse
import copy
import email.utils
import hashlib
import json
import os
import random
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
from urllib.parse import parse_qs, unquote

DEMO_TOKEN = "demo-key"  # noqa: S105 - the stand-in's published demo key
BATCHES = "/api/v1/llm/batches"
FILES = "/api/v1/llm/files"
PATH = BATCHES + "/"
FILE_PATH = re.compile(r"/api/v1/llm/files/([^/?#]+)/content")
FILE_ONE = re.compile(r"/api/v1/llm/files/([^/?#]+)")
CANCEL_PATH = re.compile(r"/api/v1/llm/batches/([^/?#]+)/cancel")
#: The endpoints a batch may name.
ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/images/generations")
#: The purposes an uploaded file may have.
PURPOSES = ("batch", "assistants", "fine-tune", "vision", "user_data", "evals")
#: The statuses that end a batch.
TERMINAL = ("completed", "failed", "expired", "cancelled")
#: The statuses ``batch_status_<status>`` has: the lifecycle's, and one no list has.
STATUSES = (
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
    "paused_for_review",
)
#: What ``Gateway.write_faults`` may hold; see Gateway.
WRITE_FAULTS = ("500", "502", "503", "504", "reset", "silent", "429", "refuse-502", "cut-upload")
#: How the batches and files lists may page, ``Gateway.list_mode``; see Gateway.
LIST_MODES = ("stable", "shuffled_ties", "keyset", "ignore_after")
#: ``batch_partial``'s requests in input order, and what became of each: a status code in its
#: output file, "error" in its error file, "drop" in neither.
PARTIAL = [
    ("request-1", 200),
    ("request-2", 429),
    ("request-3", 200),
    ("request-4", "error"),
    ("request-5", 500),
    ("request-6", "drop"),
    ("request-7", 400),
    ("request-8", 200),
]
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
#: The demo's input file, written by write_example into the directory the commands run in.
EXAMPLE = "example.jsonl"
DEMO_COMMANDS = [
    ["submit", EXAMPLE, "--endpoint", "/v1/chat/completions", "--wait", "--poll-interval", "0.2", "--results"],
    ["resubmit", "batch_partial"],
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

_STATUS_NOTES = {
    "completed": "status completed, as batch_x",
    "cancelled": "status cancelled, with a partial output file (request-3)",
    "expired": "status expired, with a partial output file (request-3)",
    "failed": "status failed, with errors",
    "paused_for_review": "status paused_for_review, one no list has",
}
#: The scripted batches, every scope's (but batch_private) and the same for each: (id, what it is).
#: No other id is a batch, but those a scope creates.
SCRIPTED_BATCHES = [
    (DOCUMENTED_EXAMPLE["id"], "the documented example's id: completed, 3 requests, 2 completed, 1 failed"),
    ("batch_x", "completed: 3 requests, 2 completed, 1 failed, an output and an error file"),
    ("batch_x<N>", "the same, for N of 1 to 5 digits (batch_x0 ... batch_x99999): many distinct ids"),
    ("batch_progress", "validating ... completed, one state of PROGRESS per GET, counted per scope"),
    ("batch_ratelimited", "429 (Retry-After: 1) on a scope's first GET, then completed"),
    ("batch_failed", "failed: its input did not validate, errors says why; no files"),
    ("batch_private", "completed for X-On-Behalf-Of user_123, 404 for anyone else"),
    ("batch_partial", "completed, 8 requests (4 completed, 4 failed), to resubmit what failed: see PARTIAL"),
] + [("batch_status_" + status, _STATUS_NOTES.get(status, "status " + status)) for status in STATUSES]
#: The scripted files: (id, what its content is).
SCRIPTED_FILES = [
    ("file-<batch_id>-output", "a scripted batch's completed results: request-3, then request-1"),
    ("file-<batch_id>-errors", "a scripted batch's failed ones: request-2"),
    ("file-batch_partial-input", "batch_partial's input: request-1 ... request-8, /v1/chat/completions"),
    ("file-batch_partial-output", "request-8, -7, -5, -3, -2, -1: status 200, 400, 500, 200, 429, 200"),
    ("file-batch_partial-errors", "request-4, a processing_error; request-6 is in neither file"),
    ("file-large-<N>", "N lines of LINE_BYTES each, made as they are sent"),
    ("file-cut-<N>", "the same, but a scope's first GET is cut mid-line a little past half way"),
    ("file-gzip-<N>", "the same lines, gzip-encoded whatever the client accepts"),
]


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

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that reset or hung up mid-request or mid-answer (a test's killed client, a read timeout) is
        # no bug of the stand-in's: socketserver's traceback would only bury the ones that are.
        if not isinstance(sys.exc_info()[1], _GONE):
            super().handle_error(request, client_address)


_BATCH_X = re.compile(r"batch_x[0-9]{1,5}")
# What a client that went away makes a handler raise (BrokenPipeError and ConnectionResetError are ConnectionErrors).
_GONE = (ConnectionError, socket.timeout)
_NAMED = frozenset(batch_id for batch_id, _ in SCRIPTED_BATCHES if "<" not in batch_id)
_PARTIAL_FILES = ("file-batch_partial-input", "file-batch_partial-output", "file-batch_partial-errors")
_SCRIPTED_AT = 1704067200  # the documented example's created_at: every scripted batch and file was made then
Answer = Tuple[int, Any, Dict[str, str]]


def scripted(batch_id: str, scope: Optional[str]) -> bool:
    """Whether ``batch_id`` is a scripted batch this scope can see (see SCRIPTED_BATCHES)."""
    if batch_id == "batch_private":
        return scope == "user_123"
    return batch_id in _NAMED or bool(_BATCH_X.fullmatch(batch_id))


class _Created:
    """A batch a scope created, and how far it has gone."""

    def __init__(self, scope: Optional[str], batch: Dict[str, Any], data: bytes) -> None:
        self.scope = scope
        self.batch = batch
        self.data = data
        self.lines: List[Tuple[int, str, Any]] = []  # (line number, custom_id, body), once validated
        self.done = 0  # how many of the lines had finished, in the order they finish (reversed)


class Gateway:
    """The stand-in, served from a thread: ``with Gateway() as gw: gw.base_url``.

    It takes the key ``demo-key`` (DEMO_TOKEN). Everything is scoped by X-On-Behalf-Of: one
    scope never sees another's batches or files.

    Scripted batches (``GET /api/v1/llm/batches/{id}``), the same in every scope; these and
    the batches a scope created are the only ids that exist, anything else is 404:

    - ``batch_aa87e2b1112a455b8deabed784372198`` (the documented example's id), ``batch_x``
      and ``batch_x<N>`` (N of 1 to 5 digits, for tests that need many distinct ids):
      completed, 3 requests, 2 completed, 1 failed, with both files;
    - ``batch_progress``: one state of PROGRESS per GET, counted per scope; a scope that
      polls it again after it sat at its end, unpolled, for ``restart_after`` seconds starts
      over from its first state (a client that keeps polling, or reads the results right
      after, sees it stay completed);
    - ``batch_ratelimited``: 429 with Retry-After: 1 on a scope's first GET, then completed;
    - ``batch_failed``: failed, with ``errors``;
    - ``batch_private``: completed for ``user_123``, 404 for anyone else;
    - ``batch_status_<status>``, for each of STATUSES (the lifecycle's and
      ``paused_for_review``, a status no list has): that status, 3 requests; cancelled and
      expired keep a partial output file (request-3);
    - ``batch_partial``: completed, for resubmitting what failed. Its input is
      ``file-batch_partial-input``, 8 chat-completion requests, request-1 to request-8 in that
      order; what became of each is PARTIAL: request-1, -3 and -8 succeeded (200),
      request-2 is a 429, request-5 a 500 and request-7 a 400 (all three in the output file,
      with an error body), request-4 is the error file's one line, request-6 is in neither
      file (counted completed: the lost line). Counts: 8 total, 4 completed, 4 failed.

    Ids ``fault_<kind>`` break the connection (see _fault). ``chaos`` makes every
    ``chaos_every``-th request (counting POSTs), if a GET, one of those faults, in turn.

    Files (``GET /api/v1/llm/files/{id}/content``, JSONL, scoped like their batch):
    ``file-<batch_id>-output`` and ``file-<batch_id>-errors`` for the scripted batches that
    name them (the output lists request-3 then request-1; the errors, request-2);
    ``file-batch_partial-input``, ``-output`` and ``-errors`` (above; ``GET
    /api/v1/llm/files/{id}`` has their File objects too); ``file-large-<N>``, N lines of
    LINE_BYTES each (see large_line), made as they are sent; ``file-cut-<N>``, the same,
    but the first GET per scope closes the connection mid-line a little past half way;
    ``file-gzip-<N>``, the same lines gzip-encoded whatever the client accepts. And the
    files a scope uploaded, and its created batches' output and error files.

    The writes. ``POST /api/v1/llm/files`` (multipart: ``file`` with a filename, not
    "blob", and ``purpose``, one of PURPOSES; a chunked body is 411) stores a file;
    ``GET /api/v1/llm/files`` lists the scope's uploads (filters ``purpose``, ``sha256``,
    ``limit``, ``after``, ``order``; newest first by default); ``GET /api/v1/llm/files/{id}``
    is one File. ``POST /api/v1/llm/batches`` creates a batch in ``validating``; each GET of
    it moves it one state: ``in_progress`` (or ``failed`` if its input does not validate:
    a line not a JSON object, no ``custom_id``, a repeated one, a method not POST, a url
    not the batch's endpoint, a body not an object), ``finalizing``, ``completed`` with its
    files: one output line per input line, in reverse input order. A line's
    ``body.mka1_standin_fail`` steers it: ``"error"`` puts it in the error file, an int
    makes its response that status with an error body, ``"drop"`` leaves it out of both
    files (counted completed). ``GET /api/v1/llm/batches?limit=&after=`` lists a scope's
    batches, newest first: its created ones, then the scripted ones (not ``batch_x<N>``).
    ``POST /api/v1/llm/batches/{id}/cancel`` makes a batch that has not ended
    ``cancelling``, and its next GET ``cancelled``, keeping what had finished (none from
    ``validating``, half from ``in_progress``, all from ``finalizing``); an ended one is 409.

    Switches, for the tests: ``write_faults``, a list of WRITE_FAULTS; each POST with the
    key and a known path takes the first off the list. "500", "502", "503", "504": the
    gateway acts (stores the file, creates the batch, cancels), then answers that status
    with an error body (JSON for 500, a proxy's HTML page for the others); "reset": acts,
    then resets the connection without an answer; "silent": acts, then sends nothing for
    ``silence`` seconds and closes; "cut-upload": reads the body, acts (stores the
    upload), resets (on any POST, the same as "reset"); "429" (``Retry-After: 0``) and
    "refuse-502": answers so without acting. ``stuck_cursor``: every batches page is the
    first, with ``has_more`` true. ``empty_has_more``: every batches page is empty, with
    ``has_more`` true. ``ignore_sha256_filter``: the files list ignores ``sha256``.

    ``clock_offset``: seconds the gateway's clock (``now()``) runs ahead of this machine's,
    behind if negative; tests may change it while the gateway runs. It dates all the
    gateway makes: a created batch's ``created_at``, ``expires_at``, the ``_at`` of each
    state it reaches (``cancelling_at`` too) and its results' ``created``, and uploads' and
    output files' ``created_at``; the scripted batches and files keep their fixed times
    (``created_at`` 1704067200). Every answer, errors and faults included, has a ``Date``
    header from that clock (IMF-fixdate); ``send_date=False`` leaves it out, as some
    proxies do.

    ``no_sha256``: every File has ``sha256`` null and the files list ignores ``sha256``, as a
    gateway that does not know it. ``file_ttl``: an upload's ``expires_at`` is its
    ``created_at`` plus these seconds (null without); 0 or less makes it expired on arrival.
    The stand-in never deletes a file: an expired one is still listed, read and batched.

    ``list_mode``, one of LIST_MODES, is how both lists page. "stable": ``after`` answers what
    follows it in the order above (an unknown one is 400). "shuffled_ties": newest first by
    ``created_at`` (oldest first for files' ``order=asc``), each second's ties in a new order on
    every request (``seed`` repeats a run's orders); ``after`` answers what follows it in this
    request's order, an unknown one from the top, so pages repeat and skip ties, as some
    OpenAI-compatible servers do. "keyset": ``after`` answers only what is older (with
    ``order=asc``, newer) than its second, so the rest of its second is skipped. "ignore_after":
    every page is the first, with an honest ``has_more``. The scripted batches all share one
    second. ``stuck_cursor`` and ``empty_has_more`` override it.

    What the tests read: ``requests`` (each request's method, path with its query, query,
    and headers), ``connections``, ``created_batches(scope)`` and ``stored_files(scope)``.
    A client that goes away mid-request or mid-answer leaves nothing on stderr; any other
    error in a handler prints its traceback there.
    """

    def __init__(
        self,
        chaos: Tuple[str, ...] = (),
        chaos_every: int = 0,
        drip: float = 0.2,
        port: int = 0,
        restart_after: float = 10.0,
        write_faults: Iterable[str] = (),
        silence: float = 3.0,
        stuck_cursor: bool = False,
        empty_has_more: bool = False,
        ignore_sha256_filter: bool = False,
        clock_offset: float = 0.0,
        send_date: bool = True,
        no_sha256: bool = False,
        file_ttl: Optional[int] = None,
        list_mode: str = "stable",
        seed: Optional[int] = None,
    ):
        if list_mode not in LIST_MODES:
            raise ValueError(f"list_mode must be one of {', '.join(LIST_MODES)}, not {list_mode!r}")
        self.chaos = chaos
        self.chaos_every = chaos_every
        self.drip = drip
        self.restart_after = restart_after
        self.write_faults = list(write_faults)
        self.silence = silence
        self.stuck_cursor = stuck_cursor
        self.empty_has_more = empty_has_more
        self.ignore_sha256_filter = ignore_sha256_filter
        self.clock_offset = clock_offset
        self.send_date = send_date
        self.no_sha256 = no_sha256
        self.file_ttl = file_ttl
        self.list_mode = list_mode
        self._random = random.Random(seed)  # shuffled_ties' orders: the same run for a seed, new on each request
        self.connections = 0
        self.requests: List[Dict[str, str]] = []
        self._polls: Dict[Tuple[Optional[str], str], Tuple[int, float]] = {}
        self._batches: List[_Created] = []
        self._files: List[Dict[str, Any]] = []  # {"scope", "meta" (the File), "data", "uploaded"}
        self._cancels: Dict[Tuple[Optional[str], str], str] = {}  # scripted batches a scope cancelled
        self._lock = threading.RLock()
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

    def now(self) -> float:
        """The gateway's clock, Unix seconds: this machine's, ``clock_offset`` seconds on."""
        return time.time() + self.clock_offset

    def created_batches(self, scope: Optional[str] = None) -> List[Dict[str, Any]]:
        """The batches this scope created, as they stand, oldest first."""
        with self._lock:
            return [copy.deepcopy(c.batch) for c in self._batches if c.scope == scope]

    def stored_files(self, scope: Optional[str] = None) -> List[Dict[str, Any]]:
        """The File objects of what this scope uploaded, oldest first."""
        with self._lock:
            return [dict(f["meta"]) for f in self._files if f["scope"] == scope and f["uploaded"]]

    def file_data(self, file_id: str, scope: Optional[str] = None) -> Optional[bytes]:
        """The bytes of a file this scope uploaded or its batches made, or None."""
        with self._lock:
            found = self._stored(file_id, scope)
            return found["data"] if found else None

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

    def answer(self, batch_id: str, scope: Optional[str]) -> Answer:
        """The status, JSON body and extra headers for a GET of this batch."""
        with self._lock:
            created = self._created(batch_id, scope)
            if created is not None:
                return 200, self._advance(created), {}
            if self._cancels.get((scope, batch_id)) == "cancelling":
                self._cancels[scope, batch_id] = "cancelled"
        if batch_id == "batch_progress" and (scope, batch_id) not in self._cancels:
            state = PROGRESS[min(self.count(scope, batch_id, len(PROGRESS)), len(PROGRESS)) - 1]
            return 200, batch_json(batch_id, *state), {}
        if batch_id == "batch_ratelimited" and self.count(scope, batch_id) == 1:
            return 429, {"error": "Rate limit exceeded"}, {"Retry-After": "1"}
        batch = self.final(batch_id, scope)
        if batch is None:
            return _not_found("Batch", batch_id)
        return 200, batch, {}

    def final(self, batch_id: str, scope: Optional[str]) -> Optional[Dict[str, Any]]:
        """A scripted batch as it ends, or None where this scope cannot see it."""
        if not scripted(batch_id, scope):
            return None
        cancelled = self._cancels.get((scope, batch_id))
        if cancelled:
            data = batch_json(batch_id, cancelled, 1, 0, 3)
            data.update(cancelling_at=1704067990)
            return data
        if batch_id == "batch_failed":
            return batch_json(batch_id, "failed", 0, 0, 0)
        if batch_id == "batch_partial":
            return dict(batch_json(batch_id, "completed", 4, 4, 8), input_file_id=_PARTIAL_FILES[0])
        if batch_id.startswith("batch_status_"):
            status = batch_id[len("batch_status_") :]
            counts = {"completed": (2, 1, 3), "failed": (0, 0, 0)}.get(status, (1, 0, 3))
            return batch_json(batch_id, status, *counts)
        return batch_json(batch_id)

    def content(self, file_id: str, scope: Optional[str]) -> Optional[Tuple[Iterable[bytes], int, Dict[str, str]]]:
        """The body's chunks, its full length and extra headers for a GET of this file, or None."""
        with self._lock:
            stored = self._stored(file_id, scope)
        if stored is not None:
            return [stored["data"]], len(stored["data"]), {}
        if file_id in _PARTIAL_FILES:
            data = _partial_files()[file_id]
            return [data], len(data), {}
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

    # --- The batches and files a scope made ---

    def _created(self, batch_id: str, scope: Optional[str]) -> Optional[_Created]:
        for created in self._batches:
            if created.batch["id"] == batch_id and created.scope == scope:
                return created
        return None

    def _stored(self, file_id: str, scope: Optional[str]) -> Optional[Dict[str, Any]]:
        for stored in self._files:
            if stored["meta"]["id"] == file_id and stored["scope"] == scope:
                return stored
        return None

    def _store(self, scope: Optional[str], data: bytes, filename: str, purpose: str, uploaded: bool) -> Dict[str, Any]:
        file_id, created_at = "file-" + uuid.uuid4().hex[:24], int(self.now())
        expires_at = created_at + int(self.file_ttl) if uploaded and self.file_ttl is not None else None
        meta = _file_json(file_id, data, filename, purpose, created_at, expires_at, self.no_sha256)
        self._files.append({"scope": scope, "meta": meta, "data": data, "uploaded": uploaded})
        return dict(meta)

    def _advance(self, created: _Created) -> Dict[str, Any]:
        """Move a created batch one state on, and answer it."""
        batch, now = created.batch, int(self.now())
        status = batch["status"]
        if status == "validating":
            errors, lines = _validate(created.data, batch["endpoint"])
            if errors:
                batch.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
            else:
                created.lines = lines
                batch.update(status="in_progress", in_progress_at=now)
                batch["request_counts"] = {"total": len(lines), "completed": 0, "failed": 0}
        elif status == "in_progress":
            created.done = len(created.lines)
            batch.update(status="finalizing", finalizing_at=now)
            batch["request_counts"] = _counts(self._outcomes(created), len(created.lines))
        elif status == "finalizing":
            self._finish(created, "completed", now)
        elif status == "cancelling":
            self._finish(created, "cancelled", now)
        return copy.deepcopy(batch)

    def _outcomes(self, created: _Created) -> List[Tuple[Optional[str], bool, bytes]]:
        finished = list(reversed(created.lines))[: created.done]
        endpoint = created.batch["endpoint"]
        return [_result_line(n, custom_id, endpoint, body, int(self.now())) for n, custom_id, body in finished]

    def _finish(self, created: _Created, status: str, now: int) -> None:
        batch, outcomes = created.batch, self._outcomes(created)
        for kind, key in [("output", "output_file_id"), ("errors", "error_file_id")]:
            data = b"".join(line for where, _, line in outcomes if where == kind)
            if data:
                name = "{}_{}.jsonl".format(batch["id"], kind)
                batch[key] = self._store(created.scope, data, name, "batch_output", uploaded=False)["id"]
        batch["request_counts"] = _counts(outcomes, len(created.lines))
        batch.update(status=status, **{status + "_at": now})

    # --- The endpoints; each answers (status, body, headers) ---

    def upload(self, scope: Optional[str], content_type: Optional[str], body: bytes) -> Answer:
        """``POST /api/v1/llm/files``."""
        try:
            parts = _multipart(content_type, body)
        except ValueError as exc:
            return _invalid(str(exc))
        if "file" not in parts:
            return _invalid("a multipart part named file is required")
        filename, data = parts["file"]
        if filename is None or not filename.strip() or filename == "blob":
            return _invalid("the file part needs a filename")
        if "purpose" not in parts:
            return _invalid("purpose is required")
        purpose = parts["purpose"][1].decode("utf-8", "replace").strip()
        if purpose not in PURPOSES:
            return _invalid("purpose must be one of " + ", ".join(PURPOSES))
        with self._lock:
            return 200, self._store(scope, data, filename, purpose, uploaded=True), {}

    def list_files(self, scope: Optional[str], query: Dict[str, str]) -> Answer:
        """``GET /api/v1/llm/files``."""
        limit = _limit(query, 10000)
        order = query.get("order", "desc")
        if limit is None:
            return _invalid("limit must be an integer from 1 to 10000")
        if order not in ("asc", "desc"):
            return _invalid('order must be "asc" or "desc"')
        with self._lock:
            files = [dict(f["meta"]) for f in self._files if f["scope"] == scope and f["uploaded"]]
        if "purpose" in query:
            files = [f for f in files if f["purpose"] == query["purpose"]]
        if "sha256" in query and not (self.ignore_sha256_filter or self.no_sha256):
            files = [f for f in files if f["sha256"] == query["sha256"].lower()]
        if order == "desc":
            files.reverse()
        return self._list_page(files, limit, query.get("after"), newest_first=order == "desc")

    def file_object(self, file_id: str, scope: Optional[str]) -> Answer:
        """``GET /api/v1/llm/files/{id}``."""
        with self._lock:
            stored = self._stored(file_id, scope)
        if stored is not None:
            return 200, dict(stored["meta"]), {}
        if file_id in _PARTIAL_FILES:
            purpose = "batch" if file_id == _PARTIAL_FILES[0] else "batch_output"
            name = file_id[len("file-") :].replace("-", "_") + ".jsonl"
            meta = _file_json(file_id, _partial_files()[file_id], name, purpose, _SCRIPTED_AT, None, self.no_sha256)
            return 200, meta, {}
        return 404, {"error": {"message": "File not found", "details": {"file_id": file_id}}}, {}

    def create(self, scope: Optional[str], body: bytes) -> Answer:
        """``POST /api/v1/llm/batches``."""
        try:
            request = json.loads(body.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is one
            return _invalid("the body is not JSON")
        if not isinstance(request, dict):
            return _invalid("the body is not a JSON object")
        file_id, endpoint, metadata = request.get("input_file_id"), request.get("endpoint"), request.get("metadata")
        concurrency = request.get("max_concurrency")
        if not isinstance(file_id, str) or not file_id:
            return _invalid("input_file_id is required")
        if endpoint not in ENDPOINTS:
            return _invalid("endpoint must be one of " + ", ".join(ENDPOINTS))
        if request.get("completion_window") != "24h":
            return _invalid('completion_window must be "24h"')
        if metadata is not None and not _is_metadata(metadata):
            return _invalid("metadata must be an object of at most 16 string keys (up to 64 characters) and values")
        if concurrency is not None and (type(concurrency) is not int or concurrency < 1):
            return _invalid("max_concurrency must be a positive integer")
        with self._lock:
            stored = self._stored(file_id, scope)
            if stored is not None:
                data, purpose = stored["data"], stored["meta"]["purpose"]
            elif file_id == _PARTIAL_FILES[0]:
                data, purpose = _partial_files()[file_id], "batch"
            else:
                return 404, {"error": {"message": "File not found", "details": {"file_id": file_id}}}, {}
            if purpose != "batch":
                return _invalid(f"the input file {file_id} has purpose {purpose}, not batch")
            now = int(self.now())
            batch = dict(DOCUMENTED_EXAMPLE, id="batch_" + uuid.uuid4().hex, endpoint=endpoint)
            batch.update({key: None for key in batch if key.endswith(("_at", "_file_id"))})
            batch.update(input_file_id=file_id, status="validating", created_at=now, expires_at=now + 86400)
            batch["metadata"] = metadata
            batch["request_counts"] = {"total": 0, "completed": 0, "failed": 0}
            if concurrency is not None:
                batch["max_concurrency"] = concurrency
            self._batches.append(_Created(scope, batch, data))
            return 200, copy.deepcopy(batch), {}

    def list_batches(self, scope: Optional[str], query: Dict[str, str]) -> Answer:
        """``GET /api/v1/llm/batches``."""
        limit = _limit(query, 100, default=20)
        if limit is None:
            return _invalid("limit must be an integer from 1 to 100")
        if self.empty_has_more:
            return 200, {"object": "list", "data": [], "has_more": True, "first_id": None, "last_id": None}, {}
        with self._lock:
            batches = [copy.deepcopy(c.batch) for c in reversed(self._batches) if c.scope == scope]
            batches += [self._peek(b, scope) for b, _ in SCRIPTED_BATCHES if "<" not in b and scripted(b, scope)]
        if self.stuck_cursor:
            status, page, headers = _page(batches, limit, None)
            return status, dict(page, has_more=True), headers
        return self._list_page(batches, limit, query.get("after"))

    def cancel(self, batch_id: str, scope: Optional[str]) -> Answer:
        """``POST /api/v1/llm/batches/{id}/cancel``."""
        with self._lock:
            created = self._created(batch_id, scope)
            if created is None and not scripted(batch_id, scope):
                return _not_found("Batch", batch_id)
            batch = created.batch if created is not None else self._peek(batch_id, scope)
            status = batch["status"]
            if status in TERMINAL:
                message = f"Batch {batch_id} is {status} and cannot be cancelled"
                return 409, {"error": {"message": message, "details": {"batch_id": batch_id, "status": status}}}, {}
            if created is None:
                self._cancels[scope, batch_id] = "cancelling"
                return 200, self.final(batch_id, scope), {}
            if status != "cancelling":
                created.done = {"in_progress": len(created.lines) // 2, "finalizing": len(created.lines)}.get(status, 0)
                batch.update(status="cancelling", cancelling_at=int(self.now()))
            return 200, copy.deepcopy(batch), {}

    def write(self, route: Tuple[str, str], scope: Optional[str], content_type: Optional[str], body: bytes) -> Answer:
        """Act on a POST to a known path."""
        name, arg = route
        if name == "upload":
            return self.upload(scope, content_type, body)
        if name == "create":
            return self.create(scope, body)
        return self.cancel(arg, scope)

    def take_fault(self) -> Optional[str]:
        """The next of ``write_faults``, taken off the list, or None."""
        with self._lock:
            faults = list(self.write_faults)
            kind = faults.pop(0) if faults else None
            self.write_faults = faults
            return kind

    def _list_page(
        self, items: List[Dict[str, Any]], limit: int, after: Optional[str], newest_first: bool = True
    ) -> Answer:
        """A page of ``items``, given in the stable order (by ``created_at``), as ``list_mode`` pages them."""
        mode = self.list_mode
        if mode == "shuffled_ties":
            with self._lock:
                self._random.shuffle(items)
            items.sort(key=lambda item: item["created_at"], reverse=newest_first)  # a stable sort: ties stay shuffled
        ids = [item["id"] for item in items]
        if mode == "ignore_after" or (mode == "shuffled_ties" and after not in ids):
            after = None  # from the top; keyset refuses an unknown cursor as stable does
        if mode == "keyset" and after in ids:
            mark = items[ids.index(after)]["created_at"]  # past after's second: its ties not yet listed are lost
            items = [
                item for item in items if (item["created_at"] < mark if newest_first else item["created_at"] > mark)
            ]
            after = None
        return _page(items, limit, after)

    def _peek(self, batch_id: str, scope: Optional[str]) -> Dict[str, Any]:
        """A scripted batch as a GET would now find it, without moving it on."""
        if batch_id == "batch_progress" and (scope, batch_id) not in self._cancels:
            n = self._polls.get((scope, batch_id), (0, 0.0))[0]
            return batch_json(batch_id, *PROGRESS[max(1, min(n, len(PROGRESS))) - 1])
        return self.final(batch_id, scope) or {}


def _not_found(what: str, batch_id: str) -> Answer:
    return 404, {"error": {"message": what + " not found", "details": {"batch_id": batch_id}}}, {}


def _invalid(message: str) -> Answer:
    return 400, {"error": {"message": message, "details": None}}, {}


def _limit(query: Dict[str, str], most: int, default: int = 0) -> Optional[int]:
    """The query's limit, ``default`` (or ``most``) if absent, None if it is not from 1 to ``most``."""
    text = query.get("limit")
    if text is None:
        return default or most
    if not re.fullmatch(r"[0-9]{1,6}", text) or not 1 <= int(text) <= most:
        return None
    return int(text)


def _page(items: List[Dict[str, Any]], limit: int, after: Optional[str]) -> Answer:
    """A list envelope of ``limit`` of ``items`` from the one after ``after``."""
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            return _invalid(f"after names no item of this list: {after}")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
    return 200, {"object": "list", "data": page, "has_more": len(items) > limit, "first_id": first, "last_id": last}, {}


def _is_metadata(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= 16
        and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items())
    )


def _file_json(
    file_id: str, data: bytes, filename: str, purpose: str, created_at: int, expires_at: Optional[int], no_sha256: bool
) -> Dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": len(data),
        "created_at": created_at,
        "filename": filename,
        "purpose": purpose,
        "expires_at": expires_at,
        "status": "processed",
        "sha256": None if no_sha256 else hashlib.sha256(data).hexdigest(),
    }


def _counts(outcomes: List[Tuple[Optional[str], bool, bytes]], total: int) -> Dict[str, int]:
    ok = sum(1 for _, succeeded, _ in outcomes if succeeded)
    return {"total": total, "completed": ok, "failed": len(outcomes) - ok}


def _params(text: str) -> Dict[str, str]:
    """The ``; key=value`` parameters of a header value, unquoted, keys in lower case."""
    params: Dict[str, str] = {}
    for match in re.finditer(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', text):
        key, value = match.group(1).lower(), match.group(2).strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1]).replace("%22", '"')
        if key.endswith("*"):  # RFC 2231: charset'language'percent-encoded
            charset, _, rest = value.partition("'")
            key, value = key[:-1], unquote(rest.partition("'")[2], encoding=charset or "utf-8", errors="replace")
            params[key] = value
        else:
            params.setdefault(key, value)
    return params


def _multipart(content_type: Optional[str], body: bytes) -> Dict[str, Tuple[Optional[str], bytes]]:
    """The parts of a multipart/form-data body by name: (filename or None, content). ValueError says what is wrong."""
    match = re.match(r"\s*multipart/form-data\s*(;.*)?$", content_type or "", re.IGNORECASE | re.DOTALL)
    if not match:
        raise ValueError("the body must be multipart/form-data")
    boundary = _params(match.group(1) or "").get("boundary")
    if not boundary:
        raise ValueError("multipart/form-data needs a boundary")
    parts: Dict[str, Tuple[Optional[str], bytes]] = {}
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a multipart part has no blank line after its headers")
        disposition = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value
        params = _params(disposition)
        if "name" in params and params["name"] not in parts:
            parts[params["name"]] = (params.get("filename"), content)
    else:
        raise ValueError("the multipart body has no closing boundary")
    return parts


def _validate(data: bytes, endpoint: str) -> Tuple[List[Dict[str, Any]], List[Tuple[int, str, Any]]]:
    """A batch input file's errors, if any, and its requests: (line number, custom_id, body)."""
    errors: List[Dict[str, Any]] = []
    lines: List[Tuple[int, str, Any]] = []

    def error(code: str, message: str, n: int, param: Optional[str] = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": n})

    if data.startswith(b"\xef\xbb\xbf"):
        error("invalid_json_line", "Line 1 starts with a UTF-8 byte order mark.", 1)
        data = data[3:]
    seen = set()
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            request = json.loads(raw.decode("utf-8"))
        except ValueError:
            error("invalid_json_line", f"Line {n} is not valid JSON.", n)
            continue
        if not isinstance(request, dict):
            error("invalid_json_line", f"Line {n} is not a JSON object.", n)
            continue
        custom_id, url = request.get("custom_id"), request.get("url")
        if not isinstance(custom_id, str) or not custom_id:
            error("missing_required_parameter", f"Line {n} has no custom_id.", n, "custom_id")
        elif custom_id in seen:
            error("duplicate_custom_id", f"Line {n} repeats the custom_id {custom_id!r}.", n, "custom_id")
        if request.get("method") != "POST":
            error("invalid_method", f"Line {n}'s method is not POST.", n, "method")
        if url != endpoint:
            error("invalid_url", f"Line {n}'s url {url!r} is not the batch's endpoint {endpoint}.", n, "url")
        if not isinstance(request.get("body"), dict):
            error("missing_required_parameter", f"Line {n} has no body object.", n, "body")
        seen.add(custom_id)
        lines.append((n, custom_id, request.get("body")))
    if not errors and not lines:
        error("empty_file", "The input file has no requests.", 1)
    return errors, lines


def _result_line(n: int, custom_id: str, endpoint: str, body: Any, now: int) -> Tuple[Optional[str], bool, bytes]:
    """Where a request's result goes ("output", "errors" or None), whether it succeeded, and its line."""
    kind = body.get("mka1_standin_fail") if isinstance(body, dict) else None
    if kind == "drop":
        return None, True, b""
    line: Dict[str, Any] = {"id": f"batch_req_{n}", "custom_id": custom_id, "response": None, "error": None}
    if kind == "error":
        line["error"] = {"code": "processing_error", "message": "The request could not be processed."}
        return "errors", False, json.dumps(line).encode() + b"\n"
    code = kind if type(kind) is int else 200
    ok = 200 <= code < 300
    if ok:
        answer = _response_body(n, endpoint, body, now)
    else:
        message = "Rate limit exceeded" if code == 429 else f"The stand-in was asked to answer {code}."
        answer = {"error": {"message": message, "type": "stand-in", "code": code}}
    line["response"] = {"status_code": code, "request_id": f"req_{n}", "body": answer}
    return "output", ok, json.dumps(line).encode() + b"\n"


def _response_body(n: int, endpoint: str, body: Dict[str, Any], now: int) -> Dict[str, Any]:
    """What the endpoint would have answered: an echo of the request."""
    model = body.get("model", "stand-in")
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages and isinstance(messages[-1], dict) else {}
    said = last.get("content") if isinstance(last.get("content"), str) else body.get("input")
    text = "You said: " + (said if isinstance(said, str) else json.dumps(said))
    usage = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    if endpoint == "/v1/embeddings":
        data = [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0]}]
        return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 3, "total_tokens": 3}}
    if endpoint == "/v1/images/generations":
        return {"created": now, "data": [{"b64_json": "aW1hZ2U=", "revised_prompt": text}]}
    if endpoint == "/v1/responses":
        content = [{"type": "output_text", "text": text}]
        output = [{"type": "message", "id": f"msg_{n}", "role": "assistant", "content": content}]
        answer = {"id": f"resp_{n}", "object": "response", "created_at": now, "status": "completed"}
        return dict(answer, model=model, output=output, usage=usage)
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    answer = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": now, "model": model}
    return dict(answer, choices=[choice], usage=usage)


def _partial_files() -> Dict[str, bytes]:
    """batch_partial's input, output and error files."""
    lines = [
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "stand-in", "messages": [{"role": "user", "content": f"Question {n}?"}]},
        }
        for n, (custom_id, _) in enumerate(PARTIAL, 1)
    ]
    files = dict.fromkeys(_PARTIAL_FILES, b"")
    files[_PARTIAL_FILES[0]] = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    for n, (custom_id, kind) in reversed(list(enumerate(PARTIAL, 1))):
        body = dict(lines[n - 1]["body"], mka1_standin_fail=kind)
        where, _, line = _result_line(n, custom_id, "/v1/chat/completions", body, _SCRIPTED_AT + 3600)
        if where:
            files["file-batch_partial-" + where] += line
    return files


def write_example(path: str) -> List[str]:
    """Write a small batch input file for /v1/chat/completions to ``path``, every line one that succeeds.

    Returns its custom_ids, in order.
    """
    questions = ["What is 2 + 2?", "Name a prime number.", "Say hello in French.", "What colour is the sky?"]
    lines = [
        {
            "custom_id": f"example-{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "stand-in", "messages": [{"role": "user", "content": question}]},
        }
        for n, question in enumerate(questions, 1)
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return [line["custom_id"] for line in lines]


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


def _route(method: str, path: str) -> Optional[Tuple[str, str]]:
    """What a request names: (what, its id or ""), or None for no route."""
    if method == "POST":
        cancel = CANCEL_PATH.fullmatch(path)
        if cancel:
            return "cancel", unquote(cancel.group(1))
        return {FILES: ("upload", ""), BATCHES: ("create", "")}.get(path)
    content, one = FILE_PATH.fullmatch(path), FILE_ONE.fullmatch(path)
    if content or one:
        return ("content" if content else "file"), unquote((content or one).group(1))
    if path in (FILES, BATCHES):
        return ("files" if path == FILES else "batches"), ""
    if path.startswith(PATH) and "/" not in path[len(PATH) :]:
        return "batch", unquote(path[len(PATH) :])
    return None


def _proxy_page(status: int) -> bytes:
    reason = BaseHTTPRequestHandler.responses.get(status, ("",))[0]
    return f"<html><body><h1>{status} {reason}</h1></body></html>".encode()


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

        def date_time_string(self, timestamp: Optional[float] = None) -> str:
            # BaseHTTPRequestHandler's own answers (send_error: an unknown method, a bad request line) come here too.
            return email.utils.formatdate(gateway.now() if timestamp is None else timestamp, usegmt=True)

        def send_header(self, keyword: str, value: str) -> None:
            if keyword != "Date" or gateway.send_date:
                super().send_header(keyword, value)

        def _record(self) -> Tuple[str, Dict[str, str], Optional[str]]:
            """Note the request; its path without the query, the query, and its scope."""
            path, _, query = self.path.partition("?")
            with gateway._lock:
                gateway.requests.append({"method": self.command, "path": self.path, "query": query, **self.headers})
                self.number = len(gateway.requests)
            return path, {k: v[0] for k, v in parse_qs(query).items()}, self.headers.get("X-On-Behalf-Of")

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == "Bearer " + DEMO_TOKEN:
                return True
            self._send(401, {"error": {"message": "Invalid API key", "details": None}})
            return False

        def do_GET(self) -> None:
            path, query, scope = self._record()
            route = _route("GET", path)
            if gateway.chaos_every and self.number % gateway.chaos_every == 0:
                self._fault(gateway.chaos[(self.number // gateway.chaos_every) % len(gateway.chaos)])
            elif route is None:
                self._send(404, {"error": {"message": "no route", "details": None}})
            elif not self._authorized():
                pass
            elif route[0] == "content":
                found = gateway.content(route[1], scope)
                if found is None:
                    self._send(404, {"error": {"message": "File not found", "details": {"file_id": route[1]}}})
                else:
                    self._stream(*found)
            elif route[0] == "batch" and route[1].startswith("fault_"):
                self._fault(route[1][len("fault_") :])
            elif route[0] == "batch":
                self._send(*gateway.answer(route[1], scope))
            elif route[0] == "file":
                self._send(*gateway.file_object(route[1], scope))
            elif route[0] == "files":
                self._send(*gateway.list_files(scope, query))
            else:
                self._send(*gateway.list_batches(scope, query))

        def _drain_chunked(self, limit: int = 2**20) -> None:
            """Read a chunked body to its last chunk, or ``limit`` bytes of it, and drop it."""
            while limit > 0:
                size = int(self.rfile.readline(100).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline(100)
                    return
                limit -= len(self.rfile.read(size + 2))

        def do_POST(self) -> None:
            path, _, scope = self._record()
            length = self.headers.get("Content-Length", "0")
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self._drain_chunked()  # so that a client still sending sees the answer, not a broken pipe
                message = {"error": {"message": "Length Required: send the body with a Content-Length"}}
                self._send(411, message, {"Connection": "close"})
                self.close_connection = True
                return
            if not re.fullmatch(r"[0-9]{1,12}", length.strip()):
                self._send(400, {"error": {"message": "Content-Length is not a number"}}, {"Connection": "close"})
                self.close_connection = True
                return
            body = self.rfile.read(int(length))
            route = _route("POST", path)
            if route is None:
                self._send(404, {"error": {"message": "no route", "details": None}})
                return
            if not self._authorized():
                return
            kind = gateway.take_fault()
            if kind == "429":
                self._send(429, {"error": "Rate limit exceeded"}, {"Retry-After": "0"})
            elif kind == "refuse-502":
                self._send(502, _proxy_page(502), {"Content-Type": "text/html"})
            elif kind is not None and kind not in WRITE_FAULTS:
                self._send(500, {"error": {"message": f"the stand-in has no write fault {kind!r}", "details": None}})
            else:
                answer = gateway.write(route, scope, self.headers.get("Content-Type"), body)
                if kind is None:
                    self._send(*answer)
                elif kind == "500":
                    self._send(500, {"error": {"message": "Internal server error", "details": None}})
                elif kind in ("502", "503", "504"):
                    self._send(int(kind), _proxy_page(int(kind)), {"Content-Type": "text/html"})
                elif kind == "silent":  # acted, then nothing: the client's read timeout is all it has
                    gateway._stop.wait(gateway.silence)
                    self.close_connection = True
                else:  # "reset", "cut-upload": acted, then a reset instead of the answer
                    self._reset()
                    self.close_connection = True

        def _head(self, status: int, headers: Dict[str, str], request_id: bool = True) -> bytes:
            items = dict(headers, Date=self.date_time_string()) if gateway.send_date else dict(headers)
            if request_id:
                items["X-Request-ID"] = f"{uuid.uuid4()}#{self.number}"
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
                self.wfile.write(self._bare(len(body)))
                for byte in body:
                    if gateway._stop.wait(gateway.drip):
                        break
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            elif kind == "hang":  # read the request, never answer
                gateway._stop.wait(30)
            elif kind == "short":  # promise more than is sent, then close
                self.wfile.write(self._bare(len(body) + 100) + body)
            elif kind == "reset_mid":  # half the body, then a reset
                self.wfile.write(self._bare(len(body)) + body[:40])
                self.wfile.flush()
                time.sleep(0.05)
                self._reset()
            elif kind == "reset":  # a reset before any response
                self._reset()
            # "drop", and every fault above but the status ones: close without another word.
            self.close_connection = kind not in ("429", "503")

        def _bare(self, length: int) -> bytes:
            """A broken answer's head: a 200 with its length and date, and no request id."""
            return self._head(200, {"Content-Length": str(length)}, request_id=False)

        def _reset(self) -> None:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    return Handler


def demo(gateway: Gateway) -> int:
    """Run each of DEMO_COMMANDS against the gateway, showing it first; return the first failing exit code, or 0."""
    import tempfile

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, MKA1_API_KEY=DEMO_TOKEN, MKA1_BASE_URL=gateway.base_url)
    env.update(PYTHONPATH=here + (os.pathsep + path if path else ""))
    env.pop("MKA1_BEARER_AUTH", None)
    print(
        f"stand-in gateway on {gateway.base_url}, with MKA1_API_KEY={DEMO_TOKEN} MKA1_BASE_URL={gateway.base_url}",
        file=sys.stderr,
        flush=True,
    )
    if gateway.clock_offset:
        print(f"Its clock runs {gateway.clock_offset:+g} s from this machine's.", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as work:
        write_example(os.path.join(work, EXAMPLE))
        for args in DEMO_COMMANDS:
            print("$ python -m mka1_batches " + " ".join(args), file=sys.stderr, flush=True)
            code = subprocess.run([sys.executable, "-m", "mka1_batches", *args], env=env, cwd=work).returncode
            if code:
                return code
    print(
        f"\nThis gateway stops now. To keep one running (key {DEMO_TOKEN}):\n"
        "  python standin_gateway.py --serve --port 8080\n"
        "and, in another shell:\n"
        "  export MKA1_BASE_URL=http://127.0.0.1:8080\n"
        f"  export MKA1_API_KEY={DEMO_TOKEN}",
        file=sys.stderr,
        flush=True,
    )
    return 0


def serve(gateway: Gateway) -> int:
    """Serve until Ctrl-C, after saying how to reach the gateway."""
    print(f"stand-in gateway on {gateway.base_url}, until Ctrl-C. In another shell:")
    print(f"  export MKA1_BASE_URL={gateway.base_url} MKA1_API_KEY={DEMO_TOKEN}")
    print(f"  python standin_gateway.py --example {EXAMPLE}")
    for args in DEMO_COMMANDS:
        print("  python -m mka1_batches " + " ".join(args))
    if gateway.clock_offset:
        print(f"Its clock runs {gateway.clock_offset:+g} s from this machine's.")
    print(f"batch_progress starts over once left at its end for {gateway.restart_after:g} s.", flush=True)
    threading.Event().wait()
    return 0  # not reached: only Ctrl-C ends the wait


def _table(rows: List[Tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "".join(f"  {name:<{width}}  {text}\n" for name, text in rows)


def main(argv: Optional[List[str]] = None) -> int:
    commands = "\n".join("  python -m mka1_batches " + " ".join(args) for args in DEMO_COMMANDS)
    parser = argparse.ArgumentParser(
        prog="python standin_gateway.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A stand-in MKA1 gateway on 127.0.0.1, with scripted batches and their files.\n\n"
        f"Without --serve, the demo: start the gateway, write {EXAMPLE}, run these against it, stop:\n" + commands,
        epilog=f"The gateway takes the API key {DEMO_TOKEN!r}. It stores uploads, and creates, lists and"
        " cancels batches.\nIts scripted batches (no other id exists, but those created):\n"
        + _table(SCRIPTED_BATCHES)
        + "\nIts scripted files (GET /api/v1/llm/files/{id}/content):\n"
        + _table(SCRIPTED_FILES)
        + "\nThe docstring of standin_gateway.Gateway says more.",
    )
    parser.add_argument("--serve", action="store_true", help="only serve, until Ctrl-C")
    parser.add_argument("--port", type=int, default=0, metavar="N", help="the port to listen on (default: a free one)")
    parser.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="run the gateway's clock this far ahead of this machine's, behind if negative (-86400: a day"
        " behind); it dates the batches and files the gateway makes, and each answer's Date header",
    )
    parser.add_argument(
        "--example", metavar="PATH", help=f"only write the demo's input file to PATH, such as {EXAMPLE}"
    )
    args = parser.parse_args(argv)
    if args.example:
        write_example(args.example)
        return 0
    if not 0 <= args.port <= 65535:
        parser.error("--port must be from 0 to 65535")
    try:
        gateway = Gateway(port=args.port, clock_offset=args.clock_offset)
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
