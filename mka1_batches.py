"""Get a batch from the MKA1 API (MeetKai's LLM gateway), and wait for it to finish.

    >>> import mka1_batches
    >>> batch = mka1_batches.get_batch(api_key, "batch_aa87e2b1112a455b8deabed784372198")
    >>> batch.status, batch.request_counts.completed, batch.request_id
    ('completed', 3, '0736e48b-3d39-48d8-806c-952c907a1b2c#12')

From a shell: ``MKA1_API_KEY=... python -m mka1_batches BATCH_ID --wait``.
One file, two dependencies (requests and attrs): copy it into your tree as it is.
"""

import contextlib
import email.utils
import http.client
import json
import logging
import random
import re
import socket
import time
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple, Union
from urllib.parse import quote, urlsplit

import attr
import requests

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_RETRY_AFTER",
    "TERMINAL_STATUSES",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "Batch",
    "BatchError",
    "BatchErrors",
    "InternalServerError",
    "InvalidResponseError",
    "MKA1Error",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestCounts",
    "UnprocessableEntityError",
    "WaitTimeoutError",
    "get_batch",
    "main",
    "wait_for_batch",
]

__version__ = "1.0.0"

#: The production gateway; self-hosted and staging gateways use their own.
DEFAULT_BASE_URL = "https://apigw.mka1.com"
#: Seconds to connect, and to wait for each read from the socket.
DEFAULT_TIMEOUT = (10.0, 30.0)
#: Statuses after which a batch never changes again.
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
#: A response body larger than this is refused unread.
MAX_BODY_BYTES = 10 * 1024 * 1024
#: A Retry-After longer than this (seconds) is raised to the caller, not slept.
MAX_RETRY_AFTER = 60.0

_Timeout = Union[float, Tuple[float, float]]

# Per data class: each known key's kind and position, a blank argument list, the required keys.
_Spec = Tuple[Dict[str, Tuple[Any, int]], List[Any], FrozenSet[str]]
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0
_EXCERPT = 200
_PATH = "/api/v1/llm/batches/"
_log = logging.getLogger("mka1_batches")
# Patched by the tests, so that no test sleeps for real.
_sleep = time.sleep


class MKA1Error(Exception):
    """Base class of every error this module raises."""


class APIConnectionError(MKA1Error):
    """The gateway could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """The gateway did not answer in time."""


class InvalidResponseError(MKA1Error, ValueError):
    """A 2xx response whose body is not a usable Batch."""

    def __init__(self, message: str, *, field: Optional[str] = None, request_id: Optional[str] = None):
        super().__init__(message)
        self.field = field
        self.request_id = request_id


class APIStatusError(MKA1Error):
    """The gateway answered with a status other than 2xx."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        request_id: Optional[str] = None,
        body: Any = None,
        retry_after: Optional[float] = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.request_id = request_id
        self.body = body
        self.retry_after = retry_after


class BadRequestError(APIStatusError):
    """400: the request was malformed."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or invalid."""


class PermissionDeniedError(APIStatusError):
    """403: the API key lacks permission."""


class NotFoundError(APIStatusError):
    """404: no such batch for this key and on-behalf-of user."""


class UnprocessableEntityError(APIStatusError):
    """422: the request was understood but refused."""


class RateLimitError(APIStatusError):
    """429: too many requests for this key; see ``retry_after``."""


class InternalServerError(APIStatusError):
    """5xx: the gateway or something behind it failed."""


class WaitTimeoutError(MKA1Error, TimeoutError):
    """``wait_for_batch`` reached ``max_wait``; ``batch`` is the last one seen."""

    def __init__(self, message: str, batch: Optional["Batch"]):
        super().__init__(message)
        self.batch = batch


_STATUS_ERRORS = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


# The data classes keep their fields in a __dict__ (no slots): attrs' frozen __init__ then
# stores each field with a dict write rather than object.__setattr__, twice as fast.
@attr.s(frozen=True)
class RequestCounts:
    """How many of a batch's requests there are, and how many have finished."""

    total: int = attr.ib()
    completed: int = attr.ib()
    failed: int = attr.ib()
    #: Keys the server sent that this version does not know, kept as received.
    extra: Dict[str, Any] = attr.ib(default=attr.Factory(dict))

    @classmethod
    def from_dict(cls, data: Any, where: str = "request_counts") -> "RequestCounts":
        """Build from the JSON object; raise InvalidResponseError naming what breaks the spec."""
        return cls(*_fields(data, where, _COUNTS_SPEC))

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object, unknown keys included."""
        return {"total": self.total, "completed": self.completed, "failed": self.failed, **self.extra}


@attr.s(frozen=True)
class BatchError:
    """One reason a batch failed validation."""

    code: str = attr.ib()
    message: str = attr.ib()
    param: Optional[str] = attr.ib(default=None)
    line: Optional[int] = attr.ib(default=None)
    extra: Dict[str, Any] = attr.ib(default=attr.Factory(dict))

    @classmethod
    def from_dict(cls, data: Any, where: str = "error") -> "BatchError":
        """Build from the JSON object; raise InvalidResponseError naming what breaks the spec."""
        return cls(*_fields(data, where, _ERROR_SPEC))

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object, unknown keys included."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line, **self.extra}


@attr.s(frozen=True)
class BatchErrors:
    """The ``errors`` of a failed batch: ``batch.errors.data[0].code``."""

    data: Tuple[BatchError, ...] = attr.ib()
    object: Optional[str] = attr.ib(default=None)
    extra: Dict[str, Any] = attr.ib(default=attr.Factory(dict))

    @classmethod
    def from_dict(cls, data: Any, where: str = "errors") -> "BatchErrors":
        """Build from the JSON object; raise InvalidResponseError naming what breaks the spec."""
        return cls(*_fields(data, where, _ERRORS_SPEC))

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object, unknown keys included."""
        return {"object": self.object, "data": [e.to_dict() for e in self.data], **self.extra}


@attr.s(frozen=True)
class Batch:
    """A batch, field for field as the API's JSON object names it."""

    id: str = attr.ib()
    object: str = attr.ib()
    endpoint: str = attr.ib()
    input_file_id: str = attr.ib()
    completion_window: str = attr.ib()
    status: str = attr.ib()
    created_at: int = attr.ib()
    request_counts: RequestCounts = attr.ib()
    errors: Optional[BatchErrors] = attr.ib(default=None)
    output_file_id: Optional[str] = attr.ib(default=None)
    error_file_id: Optional[str] = attr.ib(default=None)
    in_progress_at: Optional[int] = attr.ib(default=None)
    expires_at: Optional[int] = attr.ib(default=None)
    finalizing_at: Optional[int] = attr.ib(default=None)
    completed_at: Optional[int] = attr.ib(default=None)
    failed_at: Optional[int] = attr.ib(default=None)
    expired_at: Optional[int] = attr.ib(default=None)
    cancelling_at: Optional[int] = attr.ib(default=None)
    cancelled_at: Optional[int] = attr.ib(default=None)
    metadata: Optional[Dict[str, str]] = attr.ib(default=None)
    #: Keys the server sent that this version does not know, kept as received.
    extra: Dict[str, Any] = attr.ib(default=attr.Factory(dict))
    #: The X-Request-ID of the response this came from; quote it to support. Not an attrs
    #: field, so that two reads of one batch compare equal on every attrs release.
    request_id: Optional[str] = None

    @property
    def is_terminal(self) -> bool:
        """True once the batch is completed, failed, expired or cancelled."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_dict(cls, data: Any, request_id: Optional[str] = None) -> "Batch":
        """Build from the JSON object; raise InvalidResponseError naming what breaks the spec."""
        values = _fields(data, "batch", _BATCH_SPEC)
        if values[1] != "batch":  # values[1] is the "object" field, already checked to be a string
            raise _invalid("object", '"batch"', values[1])
        batch = cls(*values)
        batch.__dict__["request_id"] = request_id  # frozen: set once, here
        return batch

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object: every field (absent optional ones as None), unknown keys included."""
        out = {key: getattr(self, key) for key in _BATCH_SPEC[0]}
        out["request_counts"] = self.request_counts.to_dict()
        if self.errors is not None:
            out["errors"] = self.errors.to_dict()
        if self.metadata is not None:
            out["metadata"] = dict(self.metadata)
        out.update(self.extra)
        return out


def _spec(kinds: Dict[str, Any], required: int) -> _Spec:
    """What _fields needs for a data class whose attributes are ``kinds``, in order, then ``extra``.

    A kind is str or int for a plain field, or the function that checks and builds a nested
    one. The first ``required`` fields are required; the rest may be absent or null.
    """
    indexed = {key: (kind, i) for i, (key, kind) in enumerate(kinds.items())}
    return indexed, [None] * (len(kinds) + 1), frozenset(list(kinds)[:required])


def _error_list(value: Any, path: str) -> Tuple[BatchError, ...]:
    if type(value) is not list:
        raise _invalid(path, "a list", value)
    return tuple(BatchError.from_dict(item, f"{path}[{i}]") for i, item in enumerate(value))


def _metadata(value: Any, path: str) -> Dict[str, str]:
    if type(value) is not dict:
        raise _invalid(path, "an object", value)
    for key, item in value.items():
        if type(item) is not str:
            raise _invalid(f"{path}.{key}", "a string", item)
    return dict(value)


# The attributes of each data class in order, and their kinds; see _spec.
_BATCH_SPEC = _spec(
    {
        "id": str,
        "object": str,
        "endpoint": str,
        "input_file_id": str,
        "completion_window": str,
        "status": str,
        "created_at": int,
        "request_counts": RequestCounts.from_dict,
        "errors": BatchErrors.from_dict,
        "output_file_id": str,
        "error_file_id": str,
        **dict.fromkeys(("in_progress_at", "expires_at", "finalizing_at", "completed_at"), int),
        **dict.fromkeys(("failed_at", "expired_at", "cancelling_at", "cancelled_at"), int),
        "metadata": _metadata,
    },
    required=8,
)
_COUNTS_SPEC = _spec({"total": int, "completed": int, "failed": int}, required=3)
_ERRORS_SPEC = _spec({"data": _error_list, "object": str}, required=1)
_ERROR_SPEC = _spec({"code": str, "message": str, "param": str, "line": int}, required=2)


def get_batch(
    token: str,
    batch_id: str,
    on_behalf_of: Optional[str] = None,
    *,
    base_url: str = DEFAULT_BASE_URL,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> "Batch":
    """Fetch one batch by id.

    :param token: the MKA1 API key, with or without a leading ``Bearer ``.
    :param on_behalf_of: the end user this call acts for (``X-On-Behalf-Of``).
    :param timeout: seconds, or ``(connect, read)``; an attempt also ends once their sum has passed.
    :param max_retries: retries after connection errors, timeouts, 408, 429 and 5xx.
    :param session: a ``requests.Session`` to reuse; it is not changed, and left open.
    """
    call = _Call(token, batch_id, on_behalf_of, base_url, timeout, max_retries)
    with _session(session) as s:
        return call.fetch(s)


def wait_for_batch(
    token: str,
    batch_id: str,
    on_behalf_of: Optional[str] = None,
    *,
    poll_interval: float = 2.0,
    max_wait: Optional[float] = None,
    on_update: Optional[Callable[[Batch], None]] = None,
    base_url: str = DEFAULT_BASE_URL,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> "Batch":
    """Poll a batch until its status is terminal and return it, whatever the outcome.

    :param max_wait: seconds; once they pass, raise WaitTimeoutError with the last Batch seen.
    :param on_update: called with the first Batch, then whenever status or counts change.
    """
    if not _positive(poll_interval) or not (max_wait is None or _positive(max_wait)):
        raise ValueError("poll_interval and max_wait must be positive numbers of seconds")
    call = _Call(token, batch_id, on_behalf_of, base_url, timeout, max_retries)
    deadline = None if max_wait is None else time.monotonic() + max_wait
    last: Optional[Batch] = None
    with _session(session) as s:
        while True:
            batch = call.fetch(s, deadline, last)
            if on_update is not None and (
                last is None or (batch.status, batch.request_counts) != (last.status, last.request_counts)
            ):
                on_update(batch)
            last = batch
            if batch.is_terminal:
                return batch
            _sleep(_until(deadline, poll_interval, last))


class _BearerAuth(requests.auth.AuthBase):
    """Sets Authorization; passed as ``auth=``, so that ~/.netrc cannot replace it."""

    def __init__(self, token: str):
        self._header = "Bearer " + token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = self._header
        return r

    def __repr__(self) -> str:
        return "<_BearerAuth>"


class _Call:
    """One checked request: everything a GET needs, validated before any I/O."""

    def __init__(
        self,
        token: str,
        batch_id: str,
        on_behalf_of: Optional[str],
        base_url: str,
        timeout: _Timeout,
        max_retries: int,
    ):
        self.token = _check_token(token)
        self.path = _PATH + _check_batch_id(batch_id)
        self.url = _check_base_url(base_url) + self.path
        self.timeout = _check_timeout(timeout)
        if type(max_retries) is not int or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative integer, not {max_retries!r}")
        self.max_retries = max_retries
        self.auth = _BearerAuth(self.token)
        self.headers = {
            "Accept": "application/json",
            # The body is read below urllib3 (see _read_body), so it must come unencoded.
            "Accept-Encoding": "identity",
            "User-Agent": _USER_AGENT,
            # None also removes an X-On-Behalf-Of default that the caller's session may carry.
            "X-On-Behalf-Of": _check_on_behalf_of(on_behalf_of),
        }

    def fetch(self, session: requests.Session, deadline: Optional[float] = None, last: Optional[Batch] = None) -> "Batch":
        """GET the batch, retrying what is safe to retry, never sleeping past ``deadline``."""
        attempt = 1
        while True:
            try:
                return self._attempt(session, attempt)
            except (APIConnectionError, APIStatusError) as exc:
                delay = self._retry_delay(exc, attempt)
                if delay is None:
                    raise
                _log.debug(
                    "GET %s: retry %d of %d in %.2fs after: %s", self.path, attempt, self.max_retries, delay, exc
                )
                _sleep(_until(deadline, delay, last))
            attempt += 1

    def _retry_delay(self, exc: MKA1Error, attempt: int) -> Optional[float]:
        if attempt > self.max_retries:
            return None
        if isinstance(exc, APIStatusError):
            if exc.status_code not in _RETRY_STATUSES:
                return None
            if exc.retry_after is not None:
                return exc.retry_after if exc.retry_after <= MAX_RETRY_AFTER else None
        # Exponential backoff with full jitter, so that many clients do not retry in step.
        return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))  # noqa: S311 - not a secret

    def _attempt(self, session: requests.Session, attempt: int) -> "Batch":
        deadline = time.monotonic() + self.timeout[0] + self.timeout[1]
        try:
            prepared = session.prepare_request(requests.Request("GET", self.url, self.headers, auth=self.auth))
            env = session.merge_environment_settings(self.url, {}, True, None, None)
            # Session.send is passed over on purpose: even with allow_redirects=False it reads
            # a redirect's whole body (resolve_redirects), past the size cap and the deadline.
            resp = session.get_adapter(self.url).send(
                prepared,
                stream=True,
                timeout=self.timeout,
                # A None here would turn certificate checks off; the session's default is True.
                verify=True if env["verify"] is None else env["verify"],
                cert=env["cert"],
                proxies=env["proxies"],
            )
        except requests.RequestException as exc:
            raise self._connection_error(exc) from exc
        with resp:
            status = resp.status_code
            request_id = resp.headers.get("X-Request-ID")
            _log.debug("GET %s -> %d (attempt %d, request %s)", self.path, status, attempt, request_id)
            ok = 200 <= status < 300
            length = _content_length(resp)
            if ok and length is not None and length > MAX_BODY_BYTES:
                raise InvalidResponseError(_too_big(str(length)), request_id=request_id)
            body = self._read_body(resp, deadline, MAX_BODY_BYTES if ok else _ERROR_BODY_BYTES, length)
            if not ok:
                raise self._status_error(status, resp, body, request_id)
            if len(body) > MAX_BODY_BYTES:
                raise InvalidResponseError(_too_big("more than " + str(MAX_BODY_BYTES)), request_id=request_id)
            try:
                data = json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise InvalidResponseError(f"response is not JSON: {_excerpt(body)!r}", request_id=request_id) from exc
            try:
                return Batch.from_dict(data, request_id)
            except InvalidResponseError as exc:
                exc.request_id = request_id
                raise

    def _read_body(self, resp: requests.Response, deadline: float, limit: int, length: Optional[int]) -> bytes:
        """Up to limit + 1 bytes of the body, read within the attempt's deadline."""
        # urllib3's read(n) waits for all n bytes, so a server dripping one byte per read
        # timeout could hold it for hours. http.client's read1 returns after one socket
        # read, so the deadline is checked after every read.
        raw: Any = resp.raw
        fp = raw._fp
        chunks = []
        size = 0
        try:
            while size <= limit:
                chunk = fp.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise socket.timeout(f"body not read within {self.timeout[0] + self.timeout[1]}s")
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise self._connection_error(exc) from exc
        if size <= limit:
            if length is not None and size < length:
                raise APIConnectionError(f"GET {self.path} failed: connection closed after {size} of {length} bytes")
            # Whole body read: hand the connection back to the pool for the next call.
            fp.close()
            raw.release_conn()
        return b"".join(chunks)

    def _status_error(
        self, status: int, resp: requests.Response, body: bytes, request_id: Optional[str]
    ) -> APIStatusError:
        try:
            data: Any = json.loads(body)
        except (ValueError, RecursionError):
            data = body.decode("utf-8", "replace")
        location = resp.headers.get("Location")
        if 300 <= status < 400 and location:
            text = f"redirect to {location!r} not followed"
        else:
            text = _api_message(data) or _excerpt(body) or resp.reason or "no message"
        message = f"{status} {_excerpt(text)}" + (f" (request {request_id})" if request_id else "")
        cls = _STATUS_ERRORS.get(status, InternalServerError if 500 <= status < 600 else APIStatusError)
        return cls(
            self._redact(message),
            status_code=status,
            request_id=request_id,
            body=data,
            retry_after=_retry_after(resp.headers.get("Retry-After")),
        )

    def _connection_error(self, exc: BaseException) -> APIConnectionError:
        timed_out = isinstance(exc, (requests.Timeout, socket.timeout))
        cls = APITimeoutError if timed_out else APIConnectionError
        what = "timed out" if timed_out else "failed"
        return cls(self._redact(f"GET {self.path} {what}: {_excerpt(str(exc) or type(exc).__name__)}"))

    def _redact(self, text: str) -> str:
        return text.replace(self.token, "[token]")


_ERROR_BODY_BYTES = 64 * 1024
_USER_AGENT = f"mka1-batches/{__version__} python-requests/{requests.__version__}"


@contextlib.contextmanager
def _session(session: Optional[requests.Session]) -> Iterator[requests.Session]:
    if session is not None:
        yield session
        return
    with requests.Session() as own:
        yield own


def _until(deadline: Optional[float], delay: float, last: Optional[Batch]) -> float:
    """``delay``, cut short at ``deadline``; at the deadline, raise WaitTimeoutError."""
    if deadline is None:
        return delay
    left = deadline - time.monotonic()
    if left <= 0:
        status = "nothing seen yet" if last is None else f"last status {last.status!r}"
        raise WaitTimeoutError(f"batch did not reach a terminal status in time ({status})", last)
    return min(delay, left)


def _check_token(token: object) -> str:
    if not isinstance(token, str):
        raise TypeError(f"token must be a string, not {type(token).__name__}")
    scheme, _, rest = token.strip().partition(" ")
    token = rest.strip() if scheme.lower() == "bearer" else token.strip()
    # The message never echoes the token, not even a part of it.
    if not token or not _printable_ascii(token):
        raise ValueError("token must be non-empty printable ASCII, with or without a leading 'Bearer '")
    return token


def _check_batch_id(batch_id: object) -> str:
    if not isinstance(batch_id, str):
        raise TypeError(f"batch_id must be a string, not {type(batch_id).__name__}")
    # An empty id would turn the GET into a different endpoint, the list of batches.
    if not batch_id or batch_id in (".", "..") or not batch_id.isprintable():
        raise ValueError(f"batch_id must be a non-empty printable string other than . and .., not {batch_id!r}")
    return quote(batch_id, safe="")


def _check_on_behalf_of(value: object) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"on_behalf_of must be a string or None, not {type(value).__name__}")
    if not 1 <= len(value) <= 150 or not _printable_ascii(value) or value.strip() != value:
        raise ValueError(f"on_behalf_of must be 1-150 printable ASCII characters, not {_excerpt(repr(value))}")
    return value


def _check_base_url(base_url: object) -> str:
    if isinstance(base_url, str) and base_url.isprintable():
        parts = urlsplit(base_url)
        if parts.scheme in ("http", "https") and parts.netloc and not (parts.query or parts.fragment):
            return base_url.rstrip("/")
    raise ValueError(f"base_url must be an http(s) URL with no query, such as {DEFAULT_BASE_URL!r}")


def _check_timeout(timeout: Any) -> Tuple[float, float]:
    pair = tuple(timeout) if isinstance(timeout, (tuple, list)) else (timeout, timeout)
    if len(pair) != 2 or not all(_positive(t) for t in pair):
        raise ValueError(f"timeout must be seconds > 0, or a (connect, read) pair of them, not {timeout!r}")
    return (float(pair[0]), float(pair[1]))


def _printable_ascii(text: str) -> bool:
    return re.fullmatch("[ -~]+", text) is not None


def _positive(seconds: Any) -> bool:
    return type(seconds) in (int, float) and 0 < seconds < float("inf")


def _fields(data: Any, where: str, spec: _Spec) -> List[Any]:
    """A data class's positional arguments, checked in one pass; unknown keys go to ``extra``."""
    if type(data) is not dict:
        raise _invalid(where, "an object", data)
    kinds, template, required = spec
    values = template.copy()
    extra = {}
    for key, value in data.items():
        kind_index = kinds.get(key)
        if kind_index is None:
            extra[key] = value
            continue
        kind, index = kind_index
        if type(value) is kind:  # exact types: a bool is not an int
            values[index] = value
        elif value is None and key not in required:
            continue  # an optional null: the default, None, stands
        elif kind is str or kind is int:
            raise _invalid(_path(where, key), "a string" if kind is str else "an integer", value)
        else:  # _path(where, key), written out: this runs for every nested field of every batch
            values[index] = kind(value, key if where == "batch" else f"{where}.{key}")
    if not required <= data.keys():
        missing = next(key for key in kinds if key in required and key not in data)
        raise InvalidResponseError(f"{where}: missing required field {missing!r}", field=_path(where, missing))
    values[-1] = extra
    return values


def _path(where: str, key: str) -> str:
    return key if where == "batch" else f"{where}.{key}"


def _invalid(field: str, expected: str, value: Any) -> InvalidResponseError:
    got = "null" if value is None else type(value).__name__ if not isinstance(value, (str, int)) else repr(value)
    return InvalidResponseError(f"{field}: expected {expected}, got {_excerpt(got)}", field=field)


def _api_message(data: Any) -> Optional[str]:
    """The API's own message, from either envelope, or from Kong's ``{"message": ...}``."""
    if type(data) is not dict:
        return None
    error = data.get("error")
    if type(error) is dict:
        error = error.get("message")
    if type(error) is str and error.strip():
        return error
    message = data.get("message")
    return message if type(message) is str and message.strip() else None


def _excerpt(text: Union[str, bytes]) -> str:
    """One short line: markup dropped, white space folded, cut at _EXCERPT characters."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(re.sub(r"<[^>]*>", " ", text).split())
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 1] + "…"


def _content_length(resp: requests.Response) -> Optional[int]:
    length = resp.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None


def _too_big(size: str) -> str:
    return f"response body of {size} bytes is over the {MAX_BODY_BYTES}-byte limit"


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds to wait, from a Retry-After of seconds or of an HTTP date; None if unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.mktime_tz(email.utils.parsedate_tz(value)) - time.time()  # type: ignore[arg-type]
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return None if seconds != seconds else max(0.0, seconds)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m mka1_batches``: print a batch as JSON; see ``--help``."""
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m mka1_batches",
        description="Print an MKA1 batch as JSON on stdout; with --wait, wait for it to finish first.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_CLI_EPILOG,
    )
    parser.add_argument("batch_id")
    parser.add_argument("--on-behalf-of", metavar="ID", help="the end user to act for (X-On-Behalf-Of)")
    parser.add_argument("--base-url", metavar="URL", help=f"default: $MKA1_BASE_URL, else {DEFAULT_BASE_URL}")
    parser.add_argument("--timeout", metavar="S", type=float, help="connect and read timeout (default: 10, 30)")
    parser.add_argument("--wait", action="store_true", help="poll until the batch reaches a terminal status")
    parser.add_argument("--poll-interval", metavar="S", type=float, default=2.0, help="seconds between polls (2)")
    parser.add_argument("--max-wait", metavar="S", type=float, help="give up waiting after S seconds (exit 4)")
    args = parser.parse_args(argv)

    token = os.environ.get("MKA1_API_KEY") or os.environ.get("MKA1_BEARER_AUTH") or ""
    if not token.strip():
        print("error: set MKA1_API_KEY (or MKA1_BEARER_AUTH) to your MKA1 API key", file=sys.stderr)
        return 2
    options: Dict[str, Any] = {
        "base_url": args.base_url or os.environ.get("MKA1_BASE_URL") or DEFAULT_BASE_URL,
        "timeout": DEFAULT_TIMEOUT if args.timeout is None else args.timeout,
    }
    started = time.monotonic()
    tty = sys.stderr.isatty()

    def progress(batch: Batch) -> None:
        counts = batch.request_counts
        line = (
            f"{batch.status}: {counts.completed}/{counts.total} completed, {counts.failed} failed,"
            f" {time.monotonic() - started:.0f}s"
        )
        # On a terminal the line is redrawn in place; in a log, one line per change.
        sys.stderr.write(f"\r\x1b[K{line}" if tty else line + "\n")
        sys.stderr.flush()

    try:
        if args.wait:
            batch = wait_for_batch(
                token,
                args.batch_id,
                args.on_behalf_of,
                poll_interval=args.poll_interval,
                max_wait=args.max_wait,
                on_update=progress,
                **options,
            )
            if tty:
                sys.stderr.write("\n")
        else:
            batch = get_batch(token, args.batch_id, args.on_behalf_of, **options)
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        return 130
    except (MKA1Error, ValueError) as exc:
        # One line, never a traceback. No message holds the token: get_batch redacts its own.
        message = " ".join(str(exc).split())
        print(f"\nerror: {message}" if tty and args.wait else f"error: {message}", file=sys.stderr)
        if isinstance(exc, WaitTimeoutError):
            return 4
        return 1 if isinstance(exc, MKA1Error) else 2
    print(json.dumps(batch.to_dict(), indent=2))
    return 0 if not args.wait or batch.status == "completed" else 3


_CLI_EPILOG = """\
environment:
  MKA1_API_KEY       the API key (never taken as an argument: arguments show in ps)
  MKA1_BEARER_AUTH   used when MKA1_API_KEY is unset; "Bearer <key>" as MKA1's own CLI sets it
  MKA1_BASE_URL      the gateway, when --base-url is not given

exit codes:
  0    success (with --wait: the batch ended completed)
  1    API or network error
  2    usage error: bad arguments, no token, an invalid id
  3    --wait: the batch ended failed, expired or cancelled (its JSON is still printed)
  4    --wait: --max-wait passed first
  130  interrupted (Ctrl-C)
"""


if __name__ == "__main__":  # pragma: no cover - run as a subprocess by the tests
    raise SystemExit(main())
