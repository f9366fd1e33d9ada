"""Benchmark mka1_batches against hand-written requests code, in one run, as ratios of medians.

    python bench.py                # full run: exits 1 if a target does not hold
    python bench.py --quick        # small files, a few rounds, to check that it runs (CI); never fails on ratios
    python bench.py --only call --module /tmp/old   # one measure, of another copy of mka1_batches.py

Standard library plus the project; it runs on Python 3.6 and later. A canned-response
HTTP/1.1 keep-alive server runs in a child process on a free loopback port, so nearly all
the measured time is the client's. It also streams ``file-large-<N>``: N lines of 1024
bytes, the stand-in gateway's, generated as they are sent. Each pair is measured
interleaved (A, B, A, B, ...) and reported as medians and A/B.
"""

import argparse
import json
import os
import platform
import py_compile
import re
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "bench-key"  # noqa: S105 - the canned server takes any key
# The stand-in's documented example, which the canned server sends. The stand-in is imported
# only where it is used: its imports (http.server, email, uuid) would add some 10 MiB to the
# peak RSS of this process, and so to its children's (see run_process).
BATCH_ID = "batch_aa87e2b1112a455b8deabed784372198"
#: The size of every line of file-large-<N> (standin_gateway.LINE_BYTES).
LINE_BYTES = 1024
MIB = 1024 * 1024
#: What each measure compares, and its target: A/B at most this, or (files' RSS) a growth under it in MiB.
TARGETS = {"call": 1.05, "cli wall": 1.10, "cli rss": 1.10, "import": 10.0, "files wall": 1.10, "files rss": 8.0}
# The file-large-<N> path, as the canned server matches it.
FILE_PATH = re.compile(rb"/api/v1/llm/files/file-large-([0-9]+)/content")
# The bare-requests baseline for the CLI measures: the same GET, printing the status.
BARE_SCRIPT = f"""\
import os, attr, requests
r = requests.get(os.environ["MKA1_BASE_URL"] + "/api/v1/llm/batches/" + {BATCH_ID!r},
                 headers={{"Authorization": "Bearer " + os.environ["MKA1_API_KEY"], "Accept": "application/json"}},
                 timeout=(10, 30))
print(r.status_code)
"""
# The file readers, each run in a fresh process: argv is the base URL and the file id; each
# prints the lines it read and the wall seconds from the request to the last line.
FILE_SCRIPTS = {
    "A": f"""\
import sys, time
import mka1_batches
start = time.perf_counter()
count = 0
for result in mka1_batches.iter_results({TOKEN!r}, sys.argv[2], base_url=sys.argv[1]):
    count += 1
print(count, time.perf_counter() - start)
""",
    # The same headers as the module sends, but its User-Agent: both get the same bytes.
    "B": f"""\
import json, sys, time
import requests
start = time.perf_counter()
count = 0
headers = {{"Authorization": "Bearer " + {TOKEN!r}, "Accept": "*/*", "Accept-Encoding": "identity"}}
with requests.Session() as s:
    r = s.get(sys.argv[1] + "/api/v1/llm/files/" + sys.argv[2] + "/content", headers=headers, stream=True,
              timeout=(10, 30))
    r.raise_for_status()
    for line in r.iter_lines():
        json.loads(line)
        count += 1
print(count, time.perf_counter() - start)
""",
}
# CPU time of this thread only; Python 3.6 has no thread_time, and this process runs no other busy thread.
CPU_CLOCK = getattr(time, "thread_time", time.process_time)


def large_chunks(lines: int) -> Iterator[bytes]:
    """file-large-<lines>, 256 lines per chunk, made as they are sent: memory stays flat."""
    import standin_gateway

    if standin_gateway.LINE_BYTES != LINE_BYTES:
        raise SystemExit(f"the stand-in's lines are {standin_gateway.LINE_BYTES} bytes, not {LINE_BYTES}")
    for start in range(1, lines + 1, 256):
        yield b"".join([standin_gateway.large_line(i) for i in range(start, min(start + 256, lines + 1))])


def serve() -> None:
    """The canned server: a GET of file-large-<N> streams it; any other gets the same 200, in one write."""
    from standin_gateway import DOCUMENTED_EXAMPLE

    if DOCUMENTED_EXAMPLE["id"] != BATCH_ID:
        raise SystemExit(f"the stand-in's documented example is {DOCUMENTED_EXAMPLE['id']}, not {BATCH_ID}")
    body = json.dumps(dict(DOCUMENTED_EXAMPLE, max_concurrency=8)).encode()
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-ID: 0736e48b-3d39-48d8-806c-952c907a1b2c#12\r\n\r\n"
    )
    response = head.encode() + body
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

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                pending += data
                while b"\r\n\r\n" in pending:  # a GET has no body: one blank line, one request
                    request, pending = pending.split(b"\r\n\r\n", 1)
                    match = FILE_PATH.fullmatch(request.split(b" ", 2)[1])
                    try:
                        if match:
                            stream(conn, int(match.group(1)))
                        else:
                            conn.sendall(response)
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


def run_process(command: List[str], env: Dict[str, str], cwd: str) -> Tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) and stdout of one child process.

    Linux counts the spawning process's peak RSS in the child's (fork copies its counters, and
    exec records the address space it replaces), so children run while this process is still
    smaller than they are: main checks that it stayed so.
    """
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, universal_newlines=True)
    out = child.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = status
    child.stdout.close()  # type: ignore[union-attr]
    if status != 0:
        raise SystemExit(f"{command} failed: wait status {status}")
    return wall, usage.ru_maxrss, out


def bench_process(url: str, rounds: int, module_dir: str) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """Median wall time and least peak RSS of each command (a peak RSS only grows with noise)."""
    env = dict(os.environ, MKA1_API_KEY=TOKEN, MKA1_BASE_URL=url)
    ours = [sys.executable, "-m", "mka1_batches", BATCH_ID]
    bare = [sys.executable, "-c", BARE_SCRIPT]
    walls: Tuple[List[float], List[float]] = ([], [])
    rss: Tuple[List[float], List[float]] = ([], [])
    for _ in range(rounds):
        for i, command in enumerate((ours, bare)):
            wall, peak, _ = run_process(command, env, module_dir)
            walls[i].append(wall)
            rss[i].append(peak)
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
) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """Median wall time of A and B on the large file, and A's least peak RSS on the large and the small file.

    Each round runs A on the large file, B on the large file, then A on the small file.
    """
    walls: Tuple[List[float], List[float]] = ([], [])
    rss: Tuple[List[float], List[float]] = ([], [])
    for _ in range(rounds):
        for i, reader in enumerate("AB"):
            wall, peak = read_file(reader, url, large, module_dir)
            walls[i].append(wall)
            if reader == "A":
                rss[0].append(peak)
        rss[1].append(read_file("A", url, small, module_dir)[1])
    return (statistics.median(walls[0]), statistics.median(walls[1])), (min(rss[0]), min(rss[1]))


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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small files and a few rounds; never fails on ratios")
    parser.add_argument(
        "--module", metavar="DIR", default=HERE, help="measure DIR/mka1_batches.py (default: this directory's)"
    )
    parser.add_argument(
        "--only", action="append", choices=["call", "cli", "import", "files"], help="run only these measures"
    )
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]  # other work on the machine inflates every figure, and blurs the ratios
    quick = args.quick
    only = set(args.only or ["call", "cli", "import", "files"])
    module_dir = os.path.abspath(args.module)
    # Measure the module as its users run it: compiled once, from __pycache__ (this also holds
    # where PYTHONDONTWRITEBYTECODE is set, as requests' and attrs' own .pyc files already are).
    py_compile.compile(os.path.join(module_dir, "mka1_batches.py"), doraise=True)
    sys.path.insert(0, module_dir)  # bench_call's import; children run in module_dir
    rounds, calls, procs = (3, 20, 3) if quick else (31, 200, 25)
    file_rounds, small, large = (2, MIB // LINE_BYTES, 8 * MIB // LINE_BYTES) if quick else (7, 16 * 1024, 256 * 1024)
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, universal_newlines=True)
    measured: Dict[str, Tuple[float, float]] = {}
    try:
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}"  # type: ignore[union-attr]
        # The processes first: see run_process.
        if "files" in only:
            measured["files wall"], measured["files rss"] = bench_files(url, file_rounds, small, large, module_dir)
        if "cli" in only:
            measured["cli wall"], measured["cli rss"] = bench_process(url, procs, module_dir)
        parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = [measured[k][i] for k in ("files rss", "cli rss") if k in measured for i in (0, 1)]
        if children and parent >= min(children):
            raise SystemExit(
                f"this process ({parent} KiB) outgrew a child ({min(children)} KiB): peak RSS is not the child's"
            )
        if "call" in only:
            measured["call"] = bench_call(url, rounds, calls)
    finally:
        server.kill()
        server.wait()
    if "import" in only and sys.version_info >= (3, 7):  # -X importtime is 3.7's
        measured["import"] = (bench_import(procs, module_dir), 0.0)

    size = {n: f"{n * LINE_BYTES // MIB} MiB" for n in (small, large)}
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.machine()}, {versions()}")
    print(
        f"mode: {'quick' if quick else 'full'} ({rounds} rounds of {calls} calls; {procs} processes each;"
        f" files: {file_rounds} rounds of A and B on {size[large]}, then A on {size[small]})"
        + ("" if module_dir == HERE else f"; module: {module_dir}")
        + ("" if args.only is None else f"; only: {', '.join(sorted(only))}")
    )
    print(f"load average (1 min): {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    print(f"{'measure':<46} {'A (ours)':>12} {'B (baseline)':>14} {'figure':>11} {'target':>10}  verdict")
    rows = [  # key, name, unit, scale
        ("call", "1 CPU per get_batch call, shared Session", "us", 1e6),
        ("cli wall", "2 python -m mka1_batches: wall", "ms", 1e3),
        ("cli rss", "3 python -m mka1_batches: peak RSS", "MiB", 1 / 1024),
        ("import", "4 import mka1_batches: own self time", "ms", 1e3),
        ("files wall", f"5 iter_results, {size[large]} file: wall", "s", 1),
        ("files rss", f"6 iter_results peak RSS, {size[large]} vs {size[small]}", "MiB", 1 / 1024),
    ]
    held = []
    for key, name, unit, scale in rows:
        if key == "import" and key in only and key not in measured:
            print(f"{name:<46} not measured: -X importtime needs Python 3.7")
        if key not in measured:
            continue
        a, b = (x * scale for x in measured[key])
        target = TARGETS[key]
        if key == "import":  # an absolute target, in the row's unit
            b_text, figure, target_text = "-", f"{a:.2f} {unit}", f"<= {target:g} {unit}"
            held.append(a <= target)
        elif key == "files rss":  # A on the large file less A on the small one, in MiB
            b_text, figure, target_text = f"{b:.2f} {unit}", f"{a - b:+.2f} {unit}", f"< {target:g} {unit}"
            held.append(a - b < target)
        else:
            b_text, figure, target_text = f"{b:.2f} {unit}", f"{a / b:.3f}", f"<= {target:.2f}"
            held.append(a / b <= target)
        verdict = "holds" if held[-1] else "MISSED"
        print(f"{name:<46} {f'{a:.2f} {unit}':>12} {b_text:>14} {figure:>11} {target_text:>10}  {verdict}")
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
