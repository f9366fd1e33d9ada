"""What the tests share: constants, fixtures, the calls they make, loopback servers and stand-ins.

pytest finds the fixtures here by itself; the tests import the rest by name, the module under test too.
"""

import contextlib
import io
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import threading
import zlib
from typing import Any, Dict, Iterator, List
from urllib.parse import unquote

import pytest
import requests
import responses
import trustme
import urllib3

import mka1_batches as m  # the one alias line: point it at another copy to test that copy
from standin_gateway import DEMO_TOKEN, DOCUMENTED_EXAMPLE, Gateway

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "sk-mka1-S3CRET-t0ken-4242"
BASE = "https://gw.example.test"
URL = BASE + "/api/v1/llm/batches/"
BID = "batch_aa87e2b1112a455b8deabed784372198"
RID = "0736e48b-3d39-48d8-806c-952c907a1b2c#12"
EXAMPLE = DOCUMENTED_EXAMPLE
FILES = BASE + "/api/v1/llm/files/"


# --- Fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> List[float]:
    """Backoff sleeps are recorded, not slept."""
    slept: List[float] = []
    monkeypatch.setattr(m, "_sleep", slept.append)
    return slept


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch, sleeps: List[float]) -> List[float]:
    """The module's monotonic clock stands still but for its sleeps, which are recorded, not slept."""
    now = [1000.0]

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(m.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(m, "_sleep", sleep)
    return now


@pytest.fixture
def api():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def gateway():
    with Gateway() as gw:
        yield gw


@pytest.fixture(params=[-86400, 0, 86400], ids=["behind", "same", "ahead"])
def skewed_gateway(request):
    """A started stand-in whose clock is a day behind this machine's, the same, or a day ahead."""
    with Gateway(clock_offset=request.param) as gw:
        yield gw


@pytest.fixture
def plain_env(monkeypatch):
    """No proxy and no CA-bundle settings from the environment this suite runs in."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            monkeypatch.delenv(name)


@pytest.fixture
def corporate_env(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/corp-ca.pem")


@pytest.fixture
def start(plain_env):
    """Start a loopback server for this test; it stops after the test."""
    servers: List[Loopback] = []

    def started(server: Any) -> Any:
        servers.append(server.__enter__())
        return server

    yield started
    for server in reversed(servers):
        server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(start, pki):
    return start(RawServer(context=pki.context()))


@pytest.fixture
def pool_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib3 closes every connection it is handed back instead of pooling it, as if the module never gave one back."""
    monkeypatch.setattr(
        urllib3.connectionpool.HTTPConnectionPool, "_put_conn", lambda self, conn: conn and conn.close()
    )


# --- Calls and data -----------------------------------------------------------------------------


def run_text(command: List[str], **kw: Any) -> subprocess.CompletedProcess:
    """subprocess.run with output captured as text; Python 3.6 has no capture_output or text."""
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, **kw)


def default_sigint() -> None:
    """A ``preexec_fn`` for a child that a test sends SIGINT: the signal's default disposition.

    A shell or a CI runner that starts the suite in the background leaves SIGINT ignored, every child
    inherits that, and Python keeps it so: the child would never see the test's SIGINT. SIG_DFL rather
    than Python's handler, which exec resets to SIG_DFL anyway; at start, Python then installs its own.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def signalled_child(command: List[str], **kw: Any) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(command, **kw)`` for a test that sends it SIGINT: see default_sigint.

    Killed if it outlives the block, as a child that hangs would: the test fails, and the run goes on.
    """
    p = subprocess.Popen(command, preexec_fn=default_sigint, **kw)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def ok(api: responses.RequestsMock, body: Any = None, batch_id: str = BID, **kw: Any) -> None:
    headers = kw.pop("headers", {"X-Request-ID": RID})
    api.add(responses.GET, URL + batch_id, json=EXAMPLE if body is None else body, headers=headers, **kw)


def fail(api: responses.RequestsMock, status: int, body: Any = None, headers: Any = None, **kw: Any) -> None:
    body = {"error": {"message": "Batch not found", "details": None}} if body is None else body
    key = "body" if isinstance(body, (str, bytes)) else "json"
    api.add(
        responses.GET, URL + BID, status=status, headers={"X-Request-ID": RID, **(headers or {})}, **{key: body}, **kw
    )


def get(**kw: Any) -> m.Batch:
    return m.get_batch(TOKEN, kw.pop("batch_id", BID), kw.pop("on_behalf_of", None), base_url=BASE, **kw)


def live(server: Any, batch_id: str, **kw: Any) -> m.Batch:
    """get_batch from a server on 127.0.0.1, with its key: the stand-in gateway's, else TOKEN."""
    token = DEMO_TOKEN if isinstance(server, Gateway) else TOKEN
    return m.get_batch(token, batch_id, kw.pop("on_behalf_of", None), base_url=server.base_url, **kw)


def raised(call: Any) -> Any:
    with pytest.raises(m.MKA1Error) as info:
        call()
    return info.value


def add_file(api: responses.RequestsMock, file_id: str, body: Any = b"", **kw: Any) -> None:
    headers = {"X-Request-ID": RID, "Content-Type": "application/jsonl", **kw.pop("headers", {})}
    api.add(responses.GET, FILES + file_id + "/content", body=body, headers=headers, **kw)


def numbered(n: int) -> Dict[str, Any]:
    """A successful result line for ``request-<n>``."""
    response = {"status_code": 200, "request_id": f"req_{n}", "body": {"n": n}}
    return {"id": f"batch_req_{n}", "custom_id": f"request-{n}", "response": response, "error": None}


def jsonl(*lines: Any) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def requests_up_to(n: int) -> List[str]:
    return [f"request-{i}" for i in range(1, n + 1)]


def padded_line(custom_id: str, size: int) -> bytes:
    """A result line of exactly ``size`` bytes, its newline not counted."""
    head, tail = b'{"custom_id": "' + custom_id.encode() + b'", "pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def read_until_error(it: Any, error: Any, name: str = "custom_id") -> Any:
    """The custom_ids (or another attribute) of what ``it`` yielded before it raised ``error``, and the error."""
    seen: List[str] = []

    def read() -> None:
        for item in it:
            seen.append(getattr(item, name))

    with pytest.raises(error) as info:
        read()
    return seen, info.value


def live_results(base_url: str, batch: Any, **kw: Any) -> Any:
    """The results of a Batch, or of one file by its id."""
    read = m.iter_results if isinstance(batch, m.Batch) else m.iter_file
    return read(DEMO_TOKEN, batch, kw.pop("on_behalf_of", None), base_url=base_url, **kw)


# --- Loopback servers ---------------------------------------------------------------------------
# On 127.0.0.1, counting connections, so that a test can prove what reached a socket, how often, and on
# which connection. Every socket has a timeout; every thread is a daemon.


class Received:
    """One request head as a loopback server read it; header names are lower-cased."""

    def __init__(self, head: bytes, number: int):
        self.raw = head
        self.number = number  # 1 for the first request the server saw
        lines = head.decode("latin-1").split("\r\n")
        self.method, self.target, _ = lines[0].split(" ", 2)
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.batch_id = unquote(self.target.rsplit("/", 1)[-1])


class Loopback:
    """A threaded TCP server on 127.0.0.1; ``handle(conn)`` serves one connection."""

    def __init__(self) -> None:
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._open: List[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    def __enter__(self) -> Any:
        self._threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._threads[0].join(5)
        self._listener.close()
        for sock in list(self._open):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv
        for thread in self._threads[1:]:
            thread.join(5)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            self.connections += 1
            conn.settimeout(5)
            self._open.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except (OSError, ValueError):  # a client that went away, a TLS handshake refused
            pass
        finally:
            conn.close()

    def _read_head(self, conn: socket.socket, buffer: bytes) -> Any:
        """(head, rest) of the next request, or (None, b"") when the client closed."""
        while b"\r\n\r\n" not in buffer:
            data = conn.recv(65536)
            if not data:
                return None, b""
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        return head, rest


class RawServer(Loopback):
    """An HTTP/1.1 server whose answers are scripted byte for byte, over TLS if given a context.

    ``script(request)`` returns the parts to send; before each part after the first, the server
    waits (up to 2 s) for the client to move: to send more, or to close. After an answer that
    says ``Connection: close``, the server closes; otherwise it waits for the next request.
    """

    def __init__(self, script: Any = None, context: Any = None):
        super().__init__()
        self.script = script or answer
        self.context = context
        self.requests: List[Received] = []
        self.handshakes = 0
        self.peer_certs: List[Any] = []
        self.base_url = f"{'https' if context else 'http'}://127.0.0.1:{self.port}"

    def handle(self, conn: socket.socket) -> None:
        if self.context is not None:
            conn = self.context.wrap_socket(conn, server_side=True)
            self._open.append(conn)
            self.handshakes += 1
            self.peer_certs.append(conn.getpeercert())
        with conn:
            buffer = b""
            while True:
                head, buffer = self._read_head(conn, buffer)
                if head is None:
                    return
                request = Received(head, len(self.requests) + 1)
                self.requests.append(request)
                parts = self.script(request)
                for i, part in enumerate(parts):
                    if i:
                        select.select([conn], [], [], 2)
                    conn.sendall(part)
                if any(b"\r\nConnection: close\r\n" in part for part in parts):
                    return


class Proxy(Loopback):
    """A forward proxy to 127.0.0.1 only: CONNECT tunnels, and absolute-form plain HTTP relayed.

    ``seen`` holds every byte outside tunnels, ``tunnelled`` every byte inside them.
    With ``refuse`` (a status line's code and reason), it answers each CONNECT with that.
    """

    def __init__(self, refuse: str = ""):
        super().__init__()
        self.refuse = refuse
        self.connects = 0
        self.seen = bytearray()
        self.tunnelled = bytearray()
        self.url = f"http://127.0.0.1:{self.port}"

    def handle(self, conn: socket.socket) -> None:
        head, rest = self._read_head(conn, b"")
        if head is None:
            return
        request = Received(head, 0)
        self.seen += head + b"\r\n\r\n" + rest
        authority = request.target if request.method == "CONNECT" else request.target.split("/")[2]
        if request.method == "CONNECT":
            self.connects += 1
            if self.refuse:
                conn.sendall(reply(b"", self.refuse, {"Proxy-Authenticate": 'Basic realm="proxy"'}))
                return
        upstream = socket.create_connection(("127.0.0.1", int(authority.rpartition(":")[2])), timeout=5)
        self._open.append(upstream)
        with upstream:
            if request.method == "CONNECT":
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self._relay(conn, upstream, self.tunnelled)
            else:
                upstream.sendall(head + b"\r\n\r\n" + rest)
                self._relay(conn, upstream, self.seen)

    def _relay(self, client: socket.socket, upstream: socket.socket, record: bytearray) -> None:
        while True:
            ready, _, _ = select.select([client, upstream], [], [], 5)
            if not ready:
                return
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                (upstream if sock is client else client).sendall(data)
                record += data


class ScriptedServer:
    """An HTTP server on 127.0.0.1 that gives request n ``answers[n]`` (the last repeats), then closes.

    An answer is the bytes to send, or a function of the socket and a stop event.
    """

    def __init__(self, *answers: Any, tls: Any = None) -> None:
        self.answers = list(answers)
        self.requests: List[Dict[str, str]] = []
        self.stop = threading.Event()
        self._tls = tls
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.02)  # so that the accept loop sees the stop event
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            first, *fields = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            request = dict([("path", first.split(" ")[1])] + [tuple(f.split(": ", 1)) for f in fields])
            with self._lock:
                self.requests.append(request)
                answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
            if callable(answer):
                answer(conn, self.stop)
            else:
                conn.sendall(answer)
        except OSError:
            pass  # the client hung up, as a reader that stops early does
        finally:
            conn.close()


class PKI:
    """A throwaway CA from trustme, a server certificate for 127.0.0.1, a client certificate's files."""

    def __init__(self, folder: Any):
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert("127.0.0.1")
        client = self.ca.issue_cert("client.example.test")
        self.ca_pem = str(folder / "ca.pem")
        self.client_cert = str(folder / "client.pem")
        self.client_key = str(folder / "client.key")
        self.ca.cert_pem.write_to_path(self.ca_pem)
        client.cert_chain_pems[0].write_to_path(self.client_cert)
        client.private_key_pem.write_to_path(self.client_key)

    def context(self, client_cert_required: bool = False) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_cert.configure_cert(context)
        if client_cert_required:
            context.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(context)
        return context


def reply(body: bytes = b"", status: str = "200 OK", headers: Any = None, close: bool = False) -> bytes:
    """One HTTP/1.1 response; Content-Length is added unless the headers frame the body themselves.

    ``close`` adds ``Connection: close``: a server that closes after each answer must say so.
    """
    fields = dict(headers or {})
    if close:
        fields["Connection"] = "close"
    if not {"content-length", "transfer-encoding"} & {name.lower() for name in fields}:
        fields["Content-Length"] = str(len(body))
    lines = ["HTTP/1.1 " + status] + [f"{name}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def batch_body(batch_id: str) -> bytes:
    return json.dumps(dict(EXAMPLE, id=batch_id)).encode()


def answer(request: Received) -> List[bytes]:
    """The documented example, under the id asked for."""
    return [reply(batch_body(request.batch_id), headers={"Content-Type": "application/json", "X-Request-ID": RID})]


def moved(location: str) -> bytes:
    return reply(status="302 Found", headers={"Location": location}, close=True)


def chunked(body: bytes, size: int = 100) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def compress(data: bytes, wbits: int, repeat: int = 1) -> bytes:
    """``data * repeat`` as gzip (wbits 31), zlib (15) or raw deflate (-15)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return b"".join([packer.compress(data) for _ in range(repeat)] + [packer.flush()])


# --- Stand-ins for a body, an adapter and a session --------------------------------------------


class Endless(io.RawIOBase):
    """A body that never ends, counting what was read of it."""

    served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), 50 * 1024 * 1024 - self.served)  # bounded, so that a bug cannot hang the suite
        buf[:n] = b" " * n
        self.served += n
        return n


class LongLine(io.RawIOBase):
    """A result line, then a second line that never ends, counting what was read of it."""

    def __init__(self) -> None:
        self.head = jsonl(numbered(1)) + b'{"custom_id": "request-2", "pad": "'
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.head[self.served :] or b"x" * min(len(buf), 50 * 1024 * 1024 - self.served)  # bounded
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        self.served += n
        return n


class Pieces(io.RawIOBase):
    """A body served in the pieces given, one a read, as the network may split it."""

    def __init__(self, body: bytes, *cuts: int) -> None:
        assert list(cuts) == sorted(set(cuts)) and all(0 < cut < len(body) for cut in cuts), cuts
        ends = [*cuts, len(body)]
        self.pieces = [body[start:end] for start, end in zip([0, *cuts], ends)]

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        piece = self.pieces.pop(0) if self.pieces else b""
        buf[: len(piece)] = piece  # each piece is far smaller than a read asks for
        return len(piece)


class ReadOnly:
    """A file-like raw body with nothing but read(amt) and close()."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def read(self, amt: int = -1) -> bytes:
        return self._data.read(amt)

    def close(self) -> None:
        self._data.close()


class CannedAdapter(requests.adapters.BaseAdapter):
    """A test adapter as users write them: a Response built by hand, its raw a file-like object."""

    def __init__(self, raw: Any, headers: Any = None):
        super().__init__()
        self.raw = raw
        self.headers = headers or {}
        self.sent: List[Any] = []

    def send(self, request: Any, **kwargs: Any) -> requests.Response:
        self.sent.append(request)
        resp = requests.Response()
        resp.status_code, resp.reason, resp.url, resp.request = 200, "OK", request.url, request
        resp.headers["Content-Type"] = "application/json"
        resp.headers["X-Request-ID"] = RID
        resp.headers.update(self.headers)
        resp.raw = self.raw
        return resp

    def close(self) -> None:
        pass


class TracedSession(requests.Session):
    """How OpenTelemetry-style instrumentation sees a call: by overriding send."""

    def send(self, request: Any, **kwargs: Any) -> Any:
        request.headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        return super().send(request, **kwargs)
