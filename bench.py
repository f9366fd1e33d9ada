"""Benchmark mka1_batches against hand-written requests code, in one run, as ratios of medians.

    python bench.py                # full run: exits 1 if a target does not hold
    python bench.py --quick        # small files, a few rounds, to check that it runs (CI); never fails on ratios
    python bench.py --only call --module /tmp/old   # one measure, of another copy of mka1_batches.py

Standard library plus the project; it runs on Python 3.6 and later. A canned-response
HTTP/1.1 keep-alive server runs in a child process on a free loopback port, so nearly all
the measured time is the client's. It also streams ``file-large-<N>``: N lines of 1024
bytes, the stand-in gateway's, generated as they are sent, and ``batch_large_<N>``, a completed
batch whose only file is that one, for ``--results``. It takes uploads: ``GET
/api/v1/llm/files?purpose=batch&sha256=<hex>`` is an empty list, and ``POST /api/v1/llm/files``
(multipart/form-data, by Content-Length; chunked gets a 411) a File with the file part's size.
Each pair is measured interleaved (A, B, A, B, ...) and reported as medians and A/B. The
upload measures need mka1_batches.upload_file: without it, a line says they were skipped.
"""

import argparse
import json
import os
import platform
import py_compile
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Callable, Dict, Iterator, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "bench-key"  # noqa: S105 - the canned server takes any key
# The stand-in's documented example, which the canned server sends. The stand-in is imported
# only where it is used: its imports (http.server, email, uuid) would add some 10 MiB to the
# peak RSS of this process, and so to its children's (see run_process).
BATCH_ID = "batch_aa87e2b1112a455b8deabed784372198"
#: The size of every line of file-large-<N> (standin_gateway.LINE_BYTES).
LINE_BYTES = 1024
MIB = 1024 * 1024
#: What each measure compares, and its target: A/B at most this, or (the RSS of files and uploads)
#: a growth under it in MiB. "files 512" and "upload rss requests" are reported beside, not judged.
TARGETS = {
    "call": 1.00,
    "cli wall": 1.05,
    "cli rss": 1.05,
    "import": 10.0,
    "files wall": 1.5,
    "files rss": 8.0,
    "results cli": 1.00,
    "upload wall": 1.10,
    "upload rss": 24.0,
}
# The canned server's paths: file-large-<N>'s content, the batch whose output file it is, the files.
FILE_PATH = re.compile(rb"/api/v1/llm/files/file-large-([0-9]+)/content")
LARGE_BATCH_PATH = re.compile(rb"/api/v1/llm/batches/batch_large_([0-9]+)")
FILES_PATH = b"/api/v1/llm/files"
# What the canned server answers an upload: the File, with the size of the file part it read.
UPLOADED = {
    "id": "file-bench",
    "object": "file",
    "bytes": 0,
    "created_at": 1,
    "filename": "x.jsonl",
    "purpose": "batch",
    "sha256": None,
}
# The bare-requests baseline for the CLI measures: the same GET, the JSON parsed and printed as
# the CLI prints it (the same JSON, indented: bench_process checks), and attrs imported, which the
# module needs.
BARE_SCRIPT = f"""\
import json, os, attr, requests
r = requests.get(os.environ["MKA1_BASE_URL"] + "/api/v1/llm/batches/" + {BATCH_ID!r},
                 headers={{"Authorization": "Bearer " + os.environ["MKA1_API_KEY"], "Accept": "application/json"}},
                 timeout=(10, 30))
r.raise_for_status()
print(json.dumps(json.loads(r.content), indent=2))
"""
# The baseline for `python -m mka1_batches batch_large_<N> --results`: the same two GETs on one
# Session, the batch's output file read by iter_lines(chunk_size=65536), each line parsed and
# written back to stdout as compact JSON, as the CLI writes it. argv is the batch id.
RESULTS_SCRIPT = """\
import json, os, sys
import requests
url = os.environ["MKA1_BASE_URL"]
auth = {"Authorization": "Bearer " + os.environ["MKA1_API_KEY"]}
with requests.Session() as s:
    r = s.get(url + "/api/v1/llm/batches/" + sys.argv[1], headers=dict(auth, Accept="application/json"),
              timeout=(10, 30))
    r.raise_for_status()
    file_id = json.loads(r.content)["output_file_id"]
    headers = dict(auth, **{"Accept": "*/*", "Accept-Encoding": "identity"})
    r = s.get(url + "/api/v1/llm/files/" + file_id + "/content", headers=headers, stream=True, timeout=(10, 30))
    r.raise_for_status()
    for line in r.iter_lines(chunk_size=65536):
        if line:
            sys.stdout.write(json.dumps(json.loads(line), separators=(",", ":")) + "\\n")
"""
# The baseline readers: the same headers as the module sends, but its User-Agent, so both get
# the same bytes; "B" reads 64 KiB at a time, "B512" iter_lines()'s default 512 bytes.
_READER = """\
import json, sys, time
import requests
start = time.perf_counter()
count = 0
headers = {{"Authorization": "Bearer " + {token!r}, "Accept": "*/*", "Accept-Encoding": "identity"}}
with requests.Session() as s:
    r = s.get(sys.argv[1] + "/api/v1/llm/files/" + sys.argv[2] + "/content", headers=headers, stream=True,
              timeout=(10, 30))
    r.raise_for_status()
    for line in r.iter_lines({chunk}):
        if line:
            json.loads(line)
            count += 1
print(count, time.perf_counter() - start)
"""
# The file readers, each run in a fresh process: argv is the base URL and the file id; each
# prints the lines it read and the wall seconds from the request to the last line.
FILE_SCRIPTS = {
    "A": f"""\
import sys, time
import mka1_batches
start = time.perf_counter()
count = 0
for result in mka1_batches.iter_file({TOKEN!r}, sys.argv[2], base_url=sys.argv[1]):
    count += 1
print(count, time.perf_counter() - start)
""",
    "B": _READER.format(token=TOKEN, chunk="chunk_size=65536"),
    "B512": _READER.format(token=TOKEN, chunk=""),
}
# The uploaders, each run in a fresh process: argv is the base URL and the path; each prints
# the File's id and bytes, and the wall seconds of the upload.
UPLOAD_SCRIPTS = {
    "A": f"""\
import sys, time
import mka1_batches
start = time.perf_counter()
uploaded = mka1_batches.upload_file({TOKEN!r}, sys.argv[2], base_url=sys.argv[1])
print(uploaded.id, uploaded.bytes, time.perf_counter() - start)
""",
    "B": f"""\
import json, sys, time
import requests
start = time.perf_counter()
with open(sys.argv[2], "rb") as f:
    r = requests.post(sys.argv[1] + "/api/v1/llm/files", files={{"file": f}}, data={{"purpose": "batch"}},
                      headers={{"Authorization": "Bearer " + {TOKEN!r}}}, timeout=(10, 30))
r.raise_for_status()
uploaded = json.loads(r.content)
print(uploaded["id"], uploaded["bytes"], time.perf_counter() - start)
""",
}
#: How much of an upload's body the canned server keeps, at each end, to check its multipart form.
KEEP = 16384
# CPU time of this thread only; Python 3.6 has no thread_time, and this process runs no other busy thread.
CPU_CLOCK = getattr(time, "thread_time", time.process_time)


def large_chunks(lines: int) -> Iterator[bytes]:
    """file-large-<lines>, 256 lines per chunk, made as they are sent: memory stays flat."""
    import standin_gateway

    if standin_gateway.LINE_BYTES != LINE_BYTES:
        raise SystemExit(f"the stand-in's lines are {standin_gateway.LINE_BYTES} bytes, not {LINE_BYTES}")
    for start in range(1, lines + 1, 256):
        yield b"".join([standin_gateway.large_line(i) for i in range(start, min(start + 256, lines + 1))])


def answer(status: str, data: object, close: bool = False, request_id: str = "bench#1") -> bytes:
    """A whole JSON response, head and body."""
    body = json.dumps(data).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + f"X-Request-ID: {request_id}\r\n\r\n"
    )
    return head.encode() + body


def error(status: str, message: str, close: bool = False) -> bytes:
    return answer(status, {"error": {"message": message, "type": "invalid_request_error"}}, close)


def read_body(conn: socket.socket, pending: bytes, length: int) -> Tuple[bytes, int, bytes, bytes]:
    """Read ``length`` bytes of body, keeping only its first and last KEEP bytes.

    Returns the head, the offset of the tail, the tail and what came after the body. Body
    bytes are counted and dropped as they come: a large upload costs no memory.
    """
    tail_start = max(KEEP, length - KEEP)
    head, tail = bytearray(), bytearray()
    data, rest = pending[:length], pending[length:]
    offset = 0
    while True:
        end = offset + len(data)
        if offset < KEEP:
            head += data[: KEEP - offset]
        if end > tail_start:
            tail += data[max(0, tail_start - offset) :]
        offset = end
        if offset >= length:
            return bytes(head), tail_start, bytes(tail), rest
        data = conn.recv(min(262144, length - offset))
        if not data:
            raise ConnectionError("the client hung up mid-body")


def uploaded_bytes(content_type: bytes, length: int, head: bytes, tail_start: int, tail: bytes) -> Optional[int]:
    """The size of a multipart/form-data body's part ``file`` (with a filename), if its part ``purpose`` is batch.

    Only the body's ends are known (see read_body): the part headers, the purpose and the
    delimiters around the file's data must lie in them, as they do in any form of these two parts.
    """
    match = re.match(rb'multipart/form-data;.*boundary="?([^";\s]+)', content_type)
    if not match:
        return None
    delimiter = b"--" + match.group(1)
    known = [(0, head + tail)] if tail_start <= len(head) else [(0, head), (tail_start, tail)]
    at = sorted(
        (offset + m.start(), offset, text) for offset, text in known for m in re.finditer(re.escape(delimiter), text)
    )
    if not at or at[0][0] != 0 or not at[-1][2].startswith(delimiter + b"--", at[-1][0] - at[-1][1]):
        return None
    if length - at[-1][0] > len(delimiter) + 4:  # the closing delimiter, then at most a CRLF
        return None
    parts: Dict[bytes, Tuple[bool, int, bytes]] = {}
    for (start, offset, text), (end, _, _) in zip(at, at[1:]):
        headers_from = start - offset + len(delimiter) + 2
        headers_end = text.find(b"\r\n\r\n", headers_from)
        name = re.search(rb'\bname="([^"]*)"', text[headers_from:headers_end])
        if headers_end < 0 or not name:
            return None
        data_from, data_end = offset + headers_end + 4, end - 2  # the CRLF before a delimiter is not data
        value = text[data_from - offset : data_end - offset] if data_end - offset <= len(text) else b""
        parts[name.group(1)] = (b'filename="' in text[headers_from:headers_end], data_end - data_from, value)
    has_name, size, _ = parts.get(b"file", (False, 0, b""))
    if not has_name or parts.get(b"purpose", (False, 0, b""))[2] != b"batch":
        return None
    return size


def serve() -> None:
    """The canned server. GETs: file-large-<N> streams, batch_large_<N> is its batch, the list of
    files an empty one, any other the same 200, in one write. POSTs: an upload; others a 404."""
    from urllib.parse import parse_qs

    from standin_gateway import DOCUMENTED_EXAMPLE

    if DOCUMENTED_EXAMPLE["id"] != BATCH_ID:
        raise SystemExit(f"the stand-in's documented example is {DOCUMENTED_EXAMPLE['id']}, not {BATCH_ID}")
    request_id = "0736e48b-3d39-48d8-806c-952c907a1b2c#12"
    response = answer("200 OK", dict(DOCUMENTED_EXAMPLE, max_concurrency=8), request_id=request_id)
    empty = answer("200 OK", {"object": "list", "data": [], "has_more": False})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    print(listener.getsockname()[1], flush=True)

    def stream(conn: socket.socket, lines: int) -> None:
        conn.sendall(
            "HTTP/1.1 200 OK\r\nContent-Type: application/jsonl\r\n"
            f"Content-Length: {lines * LINE_BYTES}\r\nX-Request-ID: file#1\r\n\r\n".encode()
        )
        for chunk in large_chunks(lines):
            conn.sendall(chunk)

    def large_batch(lines: int) -> bytes:
        counts = {"total": lines, "completed": lines, "failed": 0}
        return answer(
            "200 OK",
            dict(
                DOCUMENTED_EXAMPLE,
                id=f"batch_large_{lines}",
                output_file_id=f"file-large-{lines}",
                error_file_id=None,
                request_counts=counts,
                max_concurrency=8,
            ),
        )

    def respond(
        conn: socket.socket,
        method: bytes,
        target: bytes,
        headers: Dict[bytes, bytes],
        body: Tuple[int, bytes, int, bytes],
    ) -> None:
        path, _, query = target.partition(b"?")
        if method == b"POST":
            size = uploaded_bytes(headers.get(b"content-type", b""), *body) if path == FILES_PATH else None
            if path != FILES_PATH:
                conn.sendall(error("404 Not Found", "no such endpoint"))
            elif size is None:
                conn.sendall(error("400 Bad Request", "not a multipart form of purpose=batch and a file"))
            else:
                conn.sendall(answer("200 OK", dict(UPLOADED, bytes=size)))
            return
        match = FILE_PATH.fullmatch(path)
        if match:
            stream(conn, int(match.group(1)))
            return
        match = LARGE_BATCH_PATH.fullmatch(path)
        if match:
            conn.sendall(large_batch(int(match.group(1))))
        elif path == FILES_PATH:
            asked = parse_qs(query.decode())
            digest = asked.get("sha256", [""])
            if asked.get("purpose") == ["batch"] and len(digest) == 1 and re.fullmatch("[0-9a-f]{64}", digest[0]):
                conn.sendall(empty)
            else:
                conn.sendall(error("400 Bad Request", "expected purpose=batch and one sha256 of 64 hex digits"))
        else:
            conn.sendall(response)

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in pending:
                        data = conn.recv(65536)
                        if not data:
                            return
                        pending += data
                    head, pending = pending.split(b"\r\n\r\n", 1)
                    lines = head.split(b"\r\n")
                    method, target = lines[0].split(b" ", 2)[:2]
                    headers = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(b":")
                        headers[name.strip().lower()] = value.strip()
                    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                        conn.sendall(error("411 Length Required", "send a Content-Length, not chunks", close=True))
                        return
                    length = int(headers.get(b"content-length", b"0"))
                    body_head, tail_start, tail, pending = read_body(conn, pending, length)
                    respond(conn, method, target, headers, (length, body_head, tail_start, tail))
            except OSError:  # the client hung up
                return

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def interleave(a: Callable[[], float], b: Callable[[], float], rounds: int) -> Tuple[float, float]:
    """Medians of a() and b(), called in turn, ``rounds`` times each."""
    times_a: List[float] = []
    times_b: List[float] = []
    for _ in range(rounds):
        times_a.append(a())
        times_b.append(b())
    return statistics.median(times_a), statistics.median(times_b)


def per_call(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    """A block of ``calls`` calls of fn, as CPU seconds per call."""

    def block() -> float:
        start = CPU_CLOCK()
        for _ in range(calls):
            fn()
        return (CPU_CLOCK() - start) / calls

    return block


def bench_call(url: str, rounds: int, calls: int) -> Tuple[float, float]:
    import requests

    import mka1_batches

    session = requests.Session()
    headers = {"Authorization": "Bearer " + TOKEN, "Accept": "application/json"}
    target = f"{url}/api/v1/llm/batches/{BATCH_ID}"

    def ours() -> object:
        return mka1_batches.get_batch(TOKEN, BATCH_ID, base_url=url, session=session)

    def bare() -> object:
        r = session.get(target, headers=headers, timeout=(10, 30))
        return json.loads(r.content)

    if ours() != mka1_batches.Batch.from_dict(bare()):  # the same answer, and a warm connection
        raise SystemExit("get_batch and the bare GET disagree")
    return interleave(per_call(ours, calls), per_call(bare, calls), rounds)


def run_process(
    command: List[str], env: Dict[str, str], cwd: str, stdout: Optional[IO[bytes]] = None
) -> Tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) and stdout of one child process.

    Linux counts the spawning process's peak RSS in the child's (fork copies its counters, and
    exec records the address space it replaces), so children run while this process is still
    smaller than they are: main checks that it stayed so.

    With ``stdout``, the child writes there instead, and its stderr (not a terminal, so no
    progress is drawn) is kept to be shown if it fails.
    """
    start = time.perf_counter()
    pipe = subprocess.PIPE
    child = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdout=stdout or pipe,
        stderr=None if stdout is None else pipe,
        universal_newlines=True,
    )
    out = (child.stdout if stdout is None else child.stderr).read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = status
    (child.stdout if stdout is None else child.stderr).close()  # type: ignore[union-attr]
    if status != 0:
        raise SystemExit(f"{command} failed: wait status {status}" + ("" if stdout is None else f"; stderr: {out}"))
    return wall, usage.ru_maxrss, out if stdout is None else ""


def bench_process(url: str, rounds: int, module_dir: str) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """Median wall time and least peak RSS of each command (a peak RSS only grows with noise)."""
    env = dict(os.environ, MKA1_API_KEY=TOKEN, MKA1_BASE_URL=url)
    ours = [sys.executable, "-m", "mka1_batches", BATCH_ID]
    bare = [sys.executable, "-c", BARE_SCRIPT]
    walls: Tuple[List[float], List[float]] = ([], [])
    rss: Tuple[List[float], List[float]] = ([], [])
    for _ in range(rounds):
        outs = []
        for i, command in enumerate((ours, bare)):
            wall, peak, out = run_process(command, env, module_dir)
            walls[i].append(wall)
            rss[i].append(peak)
            outs.append(out)
        if json.loads(outs[0]) != json.loads(outs[1]):  # the same JSON, its keys maybe in another order
            raise SystemExit(f"python -m mka1_batches and the bare script print differently:\n{outs[0]}\n{outs[1]}")
    return (statistics.median(walls[0]), statistics.median(walls[1])), (min(rss[0]), min(rss[1]))


def read_file(reader: str, url: str, lines: int, module_dir: str) -> Tuple[float, int]:
    """Wall seconds (request to last line) and peak RSS (KiB) of one fresh process reading file-large-<lines>."""
    command = [sys.executable, "-c", FILE_SCRIPTS[reader], url, f"file-large-{lines}"]
    _, peak, out = run_process(command, dict(os.environ), module_dir)
    count, seconds = out.split()
    if int(count) != lines:
        raise SystemExit(f"reader {reader} read {count} of file-large-{lines}'s {lines} lines")
    return float(seconds), peak


def bench_files(
    url: str, rounds: int, small: int, large: int, module_dir: str
) -> Tuple[Tuple[float, float], Tuple[float, float], Tuple[float, float]]:
    """Median wall time of A against B, and of A against B512, on the large file, and A's least
    peak RSS on the large and the small file.

    Each round runs A, B and B512 on the large file, then A on the small file.
    """
    walls: Dict[str, List[float]] = {"A": [], "B": [], "B512": []}
    rss: Tuple[List[float], List[float]] = ([], [])
    for _ in range(rounds):
        for reader in ("A", "B", "B512"):
            wall, peak = read_file(reader, url, large, module_dir)
            walls[reader].append(wall)
            if reader == "A":
                rss[0].append(peak)
        rss[1].append(read_file("A", url, small, module_dir)[1])
    a, b, b512 = (statistics.median(walls[reader]) for reader in ("A", "B", "B512"))
    return (a, b), (a, b512), (min(rss[0]), min(rss[1]))


def results_commands(lines: int) -> Tuple[List[str], List[str]]:
    """The CLI's --results on batch_large_<lines>, and its baseline."""
    batch = f"batch_large_{lines}"
    return [sys.executable, "-m", "mka1_batches", batch, "--results"], [sys.executable, "-c", RESULTS_SCRIPT, batch]


def check_results(url: str, lines: int, module_dir: str, tmp: str) -> None:
    """The CLI and its baseline write the same results, line for line (keys may come in another order)."""
    env = dict(os.environ, MKA1_API_KEY=TOKEN, MKA1_BASE_URL=url)
    paths = [os.path.join(tmp, name) for name in ("results-a.jsonl", "results-b.jsonl")]
    for command, path in zip(results_commands(lines), paths):
        with open(path, "wb") as out:
            run_process(command, env, module_dir, stdout=out)
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        count = 0
        for line_a, line_b in zip(a, b):
            if json.loads(line_a) != json.loads(line_b):
                raise SystemExit(f"--results and its baseline differ on line {count + 1}")
            count += 1
        if count != lines or a.read() or b.read():
            raise SystemExit(f"--results or its baseline did not write batch_large_{lines}'s {lines} lines")
    for path in paths:
        os.remove(path)


def bench_results(url: str, rounds: int, lines: int, module_dir: str) -> Tuple[float, float]:
    """Median wall time of the CLI's --results process and of its baseline's, writing to /dev/null."""
    env = dict(os.environ, MKA1_API_KEY=TOKEN, MKA1_BASE_URL=url)
    walls: Tuple[List[float], List[float]] = ([], [])
    with open(os.devnull, "wb") as devnull:
        for _ in range(rounds):
            for i, command in enumerate(results_commands(lines)):
                walls[i].append(run_process(command, env, module_dir, stdout=devnull)[0])
    return statistics.median(walls[0]), statistics.median(walls[1])


def has_upload_file(module_dir: str) -> bool:
    """Whether DIR/mka1_batches.py has upload_file, asked of a child: importing it here would grow this process."""
    script = "import sys, mka1_batches; sys.exit(0 if hasattr(mka1_batches, 'upload_file') else 3)"
    return subprocess.run([sys.executable, "-c", script], cwd=module_dir, check=False).returncode == 0


def write_upload(path: str, size: int) -> None:
    """``size`` bytes (a multiple of LINE_BYTES) of batch input lines, each LINE_BYTES of JSON, written in blocks."""
    head = '{"custom_id": "request-%d", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '
    head += '"stand-in", "messages": [{"role": "user", "content": "'
    tail = '"}]}}\n'
    with open(path, "w") as f:
        for start in range(1, size // LINE_BYTES + 1, 256):
            block = []
            for i in range(start, min(start + 256, size // LINE_BYTES + 1)):
                text = head % i
                block.append(text + "x" * (LINE_BYTES - len(text) - len(tail)) + tail)
            f.write("".join(block))


def upload(uploader: str, url: str, path: str, module_dir: str) -> Tuple[float, int]:
    """Wall seconds of the upload and peak RSS (KiB) of one fresh process uploading ``path``."""
    command = [sys.executable, "-c", UPLOAD_SCRIPTS[uploader], url, path]
    _, peak, out = run_process(command, dict(os.environ), module_dir)
    file_id, size, seconds = out.split()
    if file_id != UPLOADED["id"] or int(size) != os.path.getsize(path):
        raise SystemExit(f"uploader {uploader} got {file_id}, {size} bytes, for {path} of {os.path.getsize(path)}")
    return float(seconds), peak


def bench_upload(
    url: str, rounds: int, small: str, large: str, module_dir: str
) -> Tuple[Tuple[float, float], Tuple[float, float], Tuple[float, float]]:
    """Median wall time of A and B on the large file, and the least peak RSS of A, then of B, on
    the large and the small file. Each round runs A and B on the large file, then on the small one."""
    walls: Tuple[List[float], List[float]] = ([], [])
    rss: Dict[Tuple[str, str], List[float]] = {(u, p): [] for u in "AB" for p in (large, small)}
    for _ in range(rounds):
        for path in (large, small):
            for i, uploader in enumerate("AB"):
                wall, peak = upload(uploader, url, path, module_dir)
                if path == large:
                    walls[i].append(wall)
                rss[uploader, path].append(peak)
    least = {key: min(peaks) for key, peaks in rss.items()}
    return (
        (statistics.median(walls[0]), statistics.median(walls[1])),
        (least["A", large], least["A", small]),
        (least["B", large], least["B", small]),
    )


def bench_import(rounds: int, module_dir: str) -> float:
    """Median self time (seconds) of mka1_batches' own top level, from -X importtime."""
    selfs = []
    for _ in range(rounds):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import mka1_batches"],
            cwd=module_dir,
            stderr=subprocess.PIPE,
            universal_newlines=True,  # noqa: UP021 - Python 3.6 has no text=
            check=True,
        )
        line = next(line for line in out.stderr.splitlines() if re.search(r"\|\s*mka1_batches$", line))
        selfs.append(int(line.split(":")[1].split("|")[0]) / 1e6)
    return statistics.median(selfs)


MEASURES = ["call", "cli", "import", "files", "results", "upload"]
SKIPPED_UPLOAD = "upload: skipped, mka1_batches has no upload_file"
#: The rows that show one side's peak RSS on the large file (column A) and on the small one (column B).
GROWTH = ("files rss", "upload rss", "upload rss requests")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small files and a few rounds; never fails on ratios")
    parser.add_argument(
        "--module", metavar="DIR", default=HERE, help="measure DIR/mka1_batches.py (default: this directory's)"
    )
    parser.add_argument("--only", action="append", choices=MEASURES, help="run only these measures")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]  # other work on the machine inflates every figure, and blurs the ratios
    quick = args.quick
    only = set(args.only or MEASURES)
    module_dir = os.path.abspath(args.module)
    # Measure the module as its users run it: compiled once, from __pycache__ (this also holds
    # where PYTHONDONTWRITEBYTECODE is set, as requests' and attrs' own .pyc files already are).
    py_compile.compile(os.path.join(module_dir, "mka1_batches.py"), doraise=True)
    sys.path.insert(0, module_dir)  # bench_call's import; children run in module_dir
    rounds, calls, procs = (3, 20, 3) if quick else (31, 200, 25)
    file_rounds, small, large = (2, MIB // LINE_BYTES, 8 * MIB // LINE_BYTES) if quick else (7, 16 * 1024, 256 * 1024)
    upload_sizes = (MIB, 8 * MIB) if quick else (16 * MIB, 192 * MIB)
    uploading = "upload" in only and has_upload_file(module_dir)
    tmp = tempfile.mkdtemp(prefix="mka1-bench-")
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, universal_newlines=True)
    measured: Dict[str, Tuple[float, float]] = {}
    try:
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}"  # type: ignore[union-attr]
        # The processes first: see run_process.
        if "files" in only:
            measured["files wall"], measured["files 512"], measured["files rss"] = bench_files(
                url, file_rounds, small, large, module_dir
            )
        if "results" in only:
            check_results(url, MIB // LINE_BYTES, module_dir, tmp)
            measured["results cli"] = bench_results(url, file_rounds, large, module_dir)
        if "cli" in only:
            measured["cli wall"], measured["cli rss"] = bench_process(url, procs, module_dir)
        if uploading:
            paths = [os.path.join(tmp, f"upload-{size // MIB}.jsonl") for size in upload_sizes]
            for path, size in zip(paths, upload_sizes):
                write_upload(path, size)
            measured["upload wall"], measured["upload rss"], measured["upload rss requests"] = bench_upload(
                url, file_rounds, paths[0], paths[1], module_dir
            )
        parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_keys = ("files rss", "cli rss", "upload rss", "upload rss requests")
        children = [measured[k][i] for k in rss_keys if k in measured for i in (0, 1)]
        if children and parent >= min(children):
            raise SystemExit(
                f"this process ({parent} KiB) outgrew a child ({min(children)} KiB): peak RSS is not the child's"
            )
        if "call" in only:
            measured["call"] = bench_call(url, rounds, calls)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(tmp)
    if "import" in only and sys.version_info >= (3, 7):  # -X importtime is 3.7's
        measured["import"] = (bench_import(procs, module_dir), 0.0)

    size = {n: f"{n * LINE_BYTES // MIB} MiB" for n in (small, large)}
    up = [f"{n // MIB} MiB" for n in upload_sizes]
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.machine()}, {versions()}")
    print(
        f"mode: {'quick' if quick else 'full'} ({rounds} rounds of {calls} calls; {procs} processes each;"
        f" files: {file_rounds} rounds of A, B and B512 on {size[large]}, then A on {size[small]};"
        f" results: {file_rounds} rounds on {size[large]}; upload: {file_rounds} rounds of A and B on {up[1]}"
        f" and {up[0]})"
        + ("" if module_dir == HERE else f"; module: {module_dir}")
        + ("" if args.only is None else f"; only: {', '.join(sorted(only))}")
    )
    print(f"load average (1 min): {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    print(f"{'measure':<50} {'A (ours)':>12} {'B (baseline)':>14} {'figure':>11} {'target':>10}  verdict")
    rows = [  # key, name, unit, scale
        ("call", "1 CPU per get_batch call, shared Session", "us", 1e6),
        ("cli wall", "2 python -m mka1_batches: wall", "ms", 1e3),
        ("cli rss", "3 python -m mka1_batches: peak RSS", "MiB", 1 / 1024),
        ("import", "4 import mka1_batches: own self time", "ms", 1e3),
        ("files wall", f"5 iter_file, {size[large]} file: wall", "s", 1),
        ("files 512", "5b the same, B reading 512 bytes at a time", "s", 1),
        ("files rss", f"6 iter_file peak RSS, {size[large]} vs {size[small]}", "MiB", 1 / 1024),
        ("results cli", f"7 python -m mka1_batches --results, {size[large]}: wall", "s", 1),
        ("upload wall", f"8 upload_file, {up[1]} file: wall", "ms", 1e3),
        ("upload rss", f"9 upload_file peak RSS, {up[1]} vs {up[0]}", "MiB", 1 / 1024),
        ("upload rss requests", f"9b requests.post peak RSS, {up[1]} vs {up[0]}", "MiB", 1 / 1024),
    ]
    held = []
    for key, name, unit, scale in rows:
        if key == "import" and key in only and key not in measured:
            print(f"{name:<50} not measured: -X importtime needs Python 3.7")
        if key == "upload wall" and "upload" in only and not uploading:
            print(SKIPPED_UPLOAD)
        if key not in measured:
            continue
        a, b = (x * scale for x in measured[key])
        target = TARGETS.get(key)
        if key == "import":  # an absolute target, in the row's unit
            b_text, figure = "-", f"{a:.2f} {unit}"
            target_text, ok = f"<= {target:g} {unit}", a <= target
        elif key in GROWTH:  # the large file's peak RSS less the small one's, in MiB
            b_text, figure = f"{b:.2f} {unit}", f"{a - b:+.2f} {unit}"
            target_text, ok = ("-", None) if target is None else (f"< {target:g} {unit}", a - b < target)
        else:
            b_text, figure = f"{b:.2f} {unit}", f"{a / b:.3f}"
            target_text, ok = ("-", None) if target is None else (f"<= {target:.2f}", a / b <= target)
        if ok is not None:
            held.append(ok)
        verdict = "reported" if ok is None else "holds" if ok else "MISSED"
        print(f"{name:<50} {f'{a:.2f} {unit}':>12} {b_text:>14} {figure:>11} {target_text:>10}  {verdict}")
    print(f"targets held: {sum(held)} of {len(held)}" + (" (quick mode: not enforced)" if quick else ""))
    return 0 if quick or all(held) else 1


def versions() -> str:
    script = "import requests, urllib3, attr; print(requests.__version__, urllib3.__version__, attr.__version__)"
    out = subprocess.run(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        universal_newlines=True,  # noqa: UP021 - Python 3.6 has no text=
        check=True,
    )
    return "requests {}, urllib3 {}, attrs {}".format(*out.stdout.split())


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    raise SystemExit(main())
