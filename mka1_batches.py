# SPDX-License-Identifier: MIT
# Copyright (c) 2026 the mka1-batches authors. From the mka1-batches project; see its LICENSE.
"""Get a batch from the MKA1 API (MeetKai's LLM gateway), wait for it to finish, read its results.

    >>> import mka1_batches
    >>> batch = mka1_batches.wait_for_batch(api_key, "batch_aa87e2b1112a455b8deabed784372198")
    >>> batch.status, batch.request_counts.completed, batch.request_id
    ('completed', 3, '0736e48b-3d39-48d8-806c-952c907a1b2c#12')
    >>> for result in mka1_batches.iter_results(api_key, batch):
    ...     print(result.custom_id, result.error or result.response.status_code)

From a shell: ``MKA1_API_KEY=... python -m mka1_batches BATCH_ID --wait --results``.
One file, two dependencies (requests and attrs): copy it into your tree as it is.
"""

import contextlib
import email.utils
import functools
import http.client
import json
import logging
import random
import re
import socket
import ssl
import time
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, TypeVar, Union
from urllib.parse import quote, urljoin, urlsplit

import attr
import requests
import urllib3

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_LINE_BYTES",
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
    "BatchResult",
    "File",
    "InternalServerError",
    "InvalidResponseError",
    "MKA1Error",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestCounts",
    "ResultError",
    "ResultResponse",
    "UnprocessableEntityError",
    "WaitTimeoutError",
    "get_batch",
    "iter_results",
    "main",
    "wait_for_batch",
]

__version__ = "1.1.0"

#: The production gateway; self-hosted and staging gateways use their own.
DEFAULT_BASE_URL = "https://apigw.mka1.com"
#: Seconds to connect, and to wait for each read from the socket.
DEFAULT_TIMEOUT = (10.0, 30.0)
#: Statuses after which a batch never changes again.
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
#: A batch body larger than this, once decoded, is refused.
MAX_BODY_BYTES = 10 * 1024 * 1024
#: A result line longer than this is refused; an image-generation line holds several MB of base64.
MAX_LINE_BYTES = 64 * 1024 * 1024
#: A Retry-After longer than this (seconds) is raised to the caller, not slept.
MAX_RETRY_AFTER = 60.0

_Timeout = Union[float, Tuple[float, float]]
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0
# An error body is cut here rather than refused, so that a huge 502 page is still a 502.
_ERROR_BODY_BYTES = 64 * 1024
# The most a body read hands over at once, before and after decoding.
_CHUNK = 64 * 1024
# File content may be redirected to storage; a batch never is.
_MAX_REDIRECTS = 3
_EXCERPT = 200
_BATCHES = "/api/v1/llm/batches/"
_FILES = "/api/v1/llm/files/"
_USER_AGENT = f"mka1-batches/{__version__} python-requests/{requests.__version__}"
# What a connection error's chain holds when it timed out. Not urllib3's TimeoutError: its
# NewConnectionError, a refused connection, is one.
_TIMEOUTS = (requests.Timeout, socket.timeout, urllib3.exceptions.ReadTimeoutError)
# A connection error's root cause, in a few words, by the first of these its chain holds.
_CAUSES: List[Tuple[Any, str]] = [
    (ConnectionRefusedError, "connection refused"),
    (socket.gaierror, "name resolution failed"),
    (requests.ConnectTimeout, "connect timed out"),
    ((requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, socket.timeout), "read timed out"),
    (http.client.RemoteDisconnected, "connection closed without a response"),  # a ConnectionResetError too
    (ConnectionResetError, "connection reset"),
]
# python -m mka1_batches --help ends with this.
_CLI_EPILOG = """\
results (--results):
  One JSON object per line on stdout, ready for jq: the output file's lines, then the error
  file's. A cancelled or expired batch's partial results are written too, then exit 3.
    python -m mka1_batches BATCH_ID --wait --results | jq -r 'select(.error) | .custom_id'
  While a file streams, a terminal's stderr shows the lines and MiB read so far (not when
  stdout is that terminal too: the results show it).

environment:
  MKA1_API_KEY       the API key (never taken as an argument: arguments show in ps)
  MKA1_BEARER_AUTH   used when MKA1_API_KEY is unset; "Bearer <key>" as MKA1's own CLI sets it
  MKA1_BASE_URL      the gateway, when --base-url is not given

exit codes:
  0    success (with --wait or --results: the batch ended completed)
  1    API or network error, or a malformed results file (the results before it are written)
  2    usage error: bad arguments, no token, an invalid id, --poll-interval or --max-wait without --wait
  3    --wait or --results: the batch ended failed, expired or cancelled (its JSON, or the results
       it has, are still written)
  4    the batch has not finished: with --wait, --max-wait passed first; with --results alone,
       it is still running (nothing is written)
  130  interrupted (Ctrl-C)
  141  stdout or stderr was closed early by its reader, e.g. `| head -n1`; nothing more is written
       (128 + SIGPIPE, the code a shell shows for a program that a broken pipe stops)
"""
_log = logging.getLogger("mka1_batches")
# Patched by the tests, so that no test sleeps for real.
_sleep = time.sleep


class MKA1Error(Exception):
    """Base class of every error this module raises."""

    # Rebuilt without calling __init__, whose keyword-only arguments pickle cannot pass;
    # BaseException.__setstate__ then sets args and the attributes.
    def __reduce__(self) -> Any:
        return (type(self).__new__, (type(self),), dict(self.__dict__, args=self.args))


class APIConnectionError(MKA1Error):
    """The gateway could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """The gateway did not answer in time."""


class InvalidResponseError(MKA1Error, ValueError):
    """A 2xx response whose body is not a usable Batch or result line."""

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
    """404: no such batch or file for this key and on-behalf-of user."""


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


_M = TypeVar("_M", bound="_Model")


class _Model:
    """The one from_dict and to_dict of the data classes below."""

    # Each field but ``extra`` names its kind in its attrs metadata: str or int (exactly: a bool is
    # not an int), object (any JSON value, as received), or a function of the value and its path
    # that checks the value and builds what the field holds. A field without a default is required.

    #: Where in a response the object sits: the start of every message and of ``field``.
    _where = ""
    #: Keys the server sent that this version does not know, kept as received.
    extra: Dict[str, Any]

    @classmethod
    def from_dict(cls: Type[_M], data: Any, where: Optional[str] = None) -> _M:
        """Build from the JSON object; raise InvalidResponseError naming what breaks the spec."""
        where = where or cls._where
        if type(data) is not dict:
            raise _invalid(where, "an object", data)
        kinds, required = _kinds(cls)
        for key in required:
            if key not in data:
                raise InvalidResponseError(f"{where}: missing required field {key!r}", field=_path(where, key))
        extra: Dict[str, Any] = {}
        args = {"extra": extra}
        for key, value in data.items():
            kind = kinds.get(key)
            if kind is None:
                extra[key] = value
            elif type(value) is kind or kind is object:
                args[key] = value
            elif value is None and key not in required:
                continue  # an optional null: the default, None, stands
            elif kind is str:
                raise _invalid(_path(where, key), "a string", value)
            elif kind is int:
                raise _invalid(_path(where, key), "an integer", value)
            else:
                args[key] = kind(value, _path(where, key))
        return cls(**args)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object: every field (absent optional ones as None), unknown keys included."""
        out = {}
        for key in _kinds(type(self))[0]:
            value = getattr(self, key)
            if isinstance(value, tuple):
                value = [item.to_dict() for item in value]
            elif isinstance(value, dict):
                value = dict(value)
            elif isinstance(value, _Model):
                value = value.to_dict()
            out[key] = value
        out.update(self.extra)
        return out


# Each data class's kinds by field name, and its required fields. Built on first use, as attrs
# makes a class's fields only after its body has run.
_KINDS: Dict[type, Tuple[Dict[str, Any], Tuple[str, ...]]] = {}


def _kinds(cls: type) -> Tuple[Dict[str, Any], Tuple[str, ...]]:
    if cls not in _KINDS:
        fields = [field for field in attr.fields(cls) if "kind" in field.metadata]
        kinds = {f.name: f.metadata["kind"] for f in fields}
        _KINDS[cls] = kinds, tuple(f.name for f in fields if f.default is attr.NOTHING)
    return _KINDS[cls]


# The kinds that are functions, defined before the classes whose fields name them.
def _exactly(expected: str) -> Callable[[Any, str], str]:
    def check(value: Any, path: str) -> str:
        if value != expected:
            raise _invalid(path, f'"{expected}"', value)
        return expected

    return check


def _error_list(value: Any, path: str) -> Tuple["BatchError", ...]:
    if type(value) is not list:
        raise _invalid(path, "a list", value)
    return tuple(BatchError.from_dict(item, f"{path}[{i}]") for i, item in enumerate(value))


def _metadata(value: Any, path: str) -> Dict[str, str]:
    if type(value) is not dict:
        raise _invalid(path, "an object", value)
    for key, item in value.items():
        if type(item) is not str:
            raise _invalid(path + "." + key, "a string", item)
    return dict(value)


@attr.s(frozen=True)
class RequestCounts(_Model):
    """How many of a batch's requests there are, and how many have finished."""

    _where = "request_counts"

    total: int = attr.ib(metadata={"kind": int})
    completed: int = attr.ib(metadata={"kind": int})
    failed: int = attr.ib(metadata={"kind": int})
    extra: Dict[str, Any] = attr.ib(default=attr.Factory(dict))


@attr.s(frozen=True)
class BatchError(_Model):
    """One reason a batch failed validation."""

    _where = "error"

    code: str = attr.ib(metadata={"kind": str})
    message: str = attr.ib(metadata={"kind": str})
    param: Optional[str] = attr.ib(default=None, metadata={"kind": str})
    line: Optional[int] = attr.ib(default=None, metadata={"kind": int})
    extra: Dict[str, Any] = attr.ib(default=attr.Factory(dict))


@attr.s(frozen=True)
class BatchErrors(_Model):
    """The ``errors`` of a failed batch: ``batch.errors.data[0].code``."""

    _where = "errors"

    data: Tuple[BatchError, ...] = attr.ib(metadata={"kind": _error_list})
    object: Optional[str] = attr.ib(default=None, metadata={"kind": str})
    extra: Dict[str, Any] = attr.ib(default=attr.Factory(dict))


@attr.s(frozen=True)
class Batch(_Model):
    """A batch, field for field as the API's JSON object names it."""

    _where = "batch"

    id: str = attr.ib(metadata={"kind": str})
    object: str = attr.ib(metadata={"kind": _exactly("batch")})
    endpoint: str = attr.ib(metadata={"kind": str})
    input_file_id: str = attr.ib(metadata={"kind": str})
    completion_window: str = attr.ib(metadata={"kind": str})
    status: str = attr.ib(metadata={"kind": str})
    created_at: int = attr.ib(metadata={"kind": int})
    request_counts: RequestCounts = attr.ib(metadata={"kind": RequestCounts.from_dict})
    errors: Optional[BatchErrors] = attr.ib(default=None, metadata={"kind": BatchErrors.from_dict})
    output_file_id: Optional[str] = attr.ib(default=None, metadata={"kind": str})
    error_file_id: Optional[str] = attr.ib(default=None, metadata={"kind": str})
    in_progress_at: Optional[int] = attr.ib(default=None, metadata={"kind": int})
    expires_at: Optional[int] = attr.ib(default=None, metadata={"kind": int})
    finalizing_at: Optional[int] = attr.ib(default=None, metadata={"kind": int})
    completed_at: Optional[int] = attr.ib(default=None, metadata={"kind": int})
    failed_at: Optional[int] = attr.ib(default=None, metadata={"kind": int})
    expired_at: Optional[int] = attr.ib(default=None, metadata={"kind": int})
    cancelling_at: Optional[int] = attr.ib(default=None, metadata={"kind": int})
    cancelled_at: Optional[int] = attr.ib(default=None, metadata={"kind": int})
    metadata: Optional[Dict[str, str]] = attr.ib(default=None, metadata={"kind": _metadata})
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
        batch = super().from_dict(data)
        batch.__dict__["request_id"] = request_id  # frozen: set once, here
        return batch


@attr.s(frozen=True)
class ResultResponse(_Model):
    """The response to one request of a batch."""

    _where = "response"

    status_code: Optional[int] = attr.ib(default=None, metadata={"kind": int})
    request_id: Optional[str] = attr.ib(default=None, metadata={"kind": str})
    #: The endpoint's JSON response, as received.
    body: Any = attr.ib(default=None, metadata={"kind": object})
    extra: Dict[str, Any] = attr.ib(default=attr.Factory(dict))


@attr.s(frozen=True)
class ResultError(_Model):
    """Why one request of a batch failed."""

    _where = "error"

    code: Optional[str] = attr.ib(default=None, metadata={"kind": str})
    message: Optional[str] = attr.ib(default=None, metadata={"kind": str})
    extra: Dict[str, Any] = attr.ib(default=attr.Factory(dict))


@attr.s(frozen=True)
class BatchResult(_Model):
    """One line of a batch's output or error file: the outcome of one request, by ``custom_id``."""

    _where = "result"

    custom_id: str = attr.ib(metadata={"kind": str})
    id: Optional[str] = attr.ib(default=None, metadata={"kind": str})
    response: Optional[ResultResponse] = attr.ib(default=None, metadata={"kind": ResultResponse.from_dict})
    error: Optional[ResultError] = attr.ib(default=None, metadata={"kind": ResultError.from_dict})
    extra: Dict[str, Any] = attr.ib(default=attr.Factory(dict))


@attr.s(frozen=True)
class File(_Model):
    """An uploaded file, such as a batch's input, as the API's JSON object names it."""

    _where = "file"

    id: str = attr.ib(metadata={"kind": str})
    object: str = attr.ib(metadata={"kind": _exactly("file")})
    bytes: int = attr.ib(metadata={"kind": int})
    created_at: int = attr.ib(metadata={"kind": int})
    filename: str = attr.ib(metadata={"kind": str})
    purpose: str = attr.ib(metadata={"kind": str})
    expires_at: Optional[int] = attr.ib(default=None, metadata={"kind": int})
    status: Optional[str] = attr.ib(default=None, metadata={"kind": str})
    status_details: Optional[str] = attr.ib(default=None, metadata={"kind": str})
    sha256: Optional[str] = attr.ib(default=None, metadata={"kind": str})
    extra: Dict[str, Any] = attr.ib(default=attr.Factory(dict))


def get_batch(
    token: str,
    batch_id: str,
    on_behalf_of: Optional[str] = None,
    *,
    base_url: str = DEFAULT_BASE_URL,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> Batch:
    """Fetch one batch by id.

    :param token: the MKA1 API key, with or without a leading ``Bearer ``.
    :param batch_id: the batch's id, such as ``batch_aa87e2b1112a455b8deabed784372198``.
    :param on_behalf_of: the end user this call acts for (``X-On-Behalf-Of``).
    :param base_url: the gateway, for self-hosted and staging gateways.
    :param timeout: seconds, or ``(connect, read)``; always sent. An attempt also ends once their
        sum has passed, while connecting or reading the body. The status line and headers are
        bounded only by the read timeout per socket read and http.client's own line-length and
        header-count limits.
    :param max_retries: retries after connection errors, timeouts, 408, 429 and 5xx. A urllib3
        ``Retry`` mounted on the session's adapter runs first, inside each attempt.
    :param session: a ``requests.Session`` to reuse; it is not changed, and left open.
    :raises APIStatusError: a status other than 2xx, as the subclass for that status.
    :raises APIConnectionError: the gateway could not be reached in time, or the connection broke.
    :raises InvalidResponseError: the body is not a Batch, or is another batch than the one asked for.
    :raises ValueError, TypeError: a bad argument, before any I/O.
    """
    client = _Client(token, on_behalf_of, base_url, timeout, max_retries, _sleep)
    path = _BATCHES + _check_id(batch_id, "batch_id")
    with _session(session) as s:
        return client.get_batch(s, path, batch_id)


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
) -> Batch:
    """Poll a batch until its status is terminal and return it, whatever the outcome.

    One Session, so one kept-alive connection, serves the whole wait.

    :param poll_interval: seconds between polls.
    :param max_wait: seconds; no sleep, between polls or before a retry, runs past them. Once they
        have passed, raise WaitTimeoutError with the last Batch seen. A request in flight may
        still take up to its own timeout.
    :param on_update: called with the first Batch, then whenever status or counts change.
    :param session: a ``requests.Session`` to reuse; it is not changed, and left open.

    The other parameters, and the errors raised, are those of :func:`get_batch`; and
    :raises WaitTimeoutError: ``max_wait`` passed first.
    """
    if not _positive(poll_interval):
        raise ValueError(f"poll_interval must be a positive number of seconds, not {poll_interval!r}")
    if max_wait is not None and not _positive(max_wait):
        raise ValueError(f"max_wait must be None or a positive number of seconds, not {max_wait!r}")
    deadline = None if max_wait is None else time.monotonic() + max_wait
    last: Optional[Batch] = None

    def sleep(seconds: float) -> None:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                seen = "nothing seen yet" if last is None else f"last status {last.status!r}"
                raise WaitTimeoutError(f"batch did not reach a terminal status in time ({seen})", last)
            seconds = min(seconds, left)
        _sleep(seconds)

    client = _Client(token, on_behalf_of, base_url, timeout, max_retries, sleep)
    path = _BATCHES + _check_id(batch_id, "batch_id")
    with _session(session) as s:
        while True:
            batch = client.get_batch(s, path, batch_id)
            changed = last is None or (batch.status, batch.request_counts) != (last.status, last.request_counts)
            if on_update is not None and changed:
                on_update(batch)
            last = batch
            if batch.is_terminal:
                return batch
            sleep(poll_interval)


def iter_results(
    token: str,
    batch: Union[Batch, str],
    on_behalf_of: Optional[str] = None,
    *,
    include_errors: bool = True,
    base_url: str = DEFAULT_BASE_URL,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> Iterator[BatchResult]:
    """Yield a finished batch's results, one per line: its output file's, then its error file's.

    The file streams: memory does not grow with its size. A connection that breaks mid-file is
    re-requested, and the lines already yielded are skipped.

    :param batch: a terminal Batch (a cancelled or expired one yields its partial results), or
        the id of one file to read.
    :param include_errors: also yield the lines of the batch's ``error_file_id``.
    :param timeout: seconds, or ``(connect, read)``; the next line must come within their sum.

    The other parameters are those of :func:`get_batch`. Errors are raised as the iteration
    reaches them, and the results before them have been yielded:
    :raises InvalidResponseError: a malformed line or one over MAX_LINE_BYTES (naming the file
        and the line), or a file that changed while it was read again.
    :raises APIStatusError, APIConnectionError: as for :func:`get_batch`.
    :raises ValueError, TypeError: a bad argument or a batch that is not finished, before any I/O.
    """
    client = _Client(token, on_behalf_of, base_url, timeout, max_retries, _sleep)
    return client.iter_results(session, _file_ids(batch, include_errors))


class _BearerAuth(requests.auth.AuthBase):
    """Sets Authorization; passed as ``auth=``, so that ~/.netrc cannot replace it."""

    def __init__(self, token: Optional[str]):
        self._header = None if token is None else "Bearer " + token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        # None: a redirect to another host, which must see neither the key nor the session's.
        if self._header is None:
            r.headers.pop("Authorization", None)
        else:
            r.headers["Authorization"] = self._header
        return r

    def __repr__(self) -> str:
        return "<_BearerAuth>"


class _Redirect(Exception):
    """Raised by a response hook, so that Session.send does not read a redirect's body whole."""

    def __init__(self, response: requests.Response):
        super().__init__(response.status_code)
        self.response = response


def _stop_at_redirect(response: requests.Response, **kwargs: Any) -> requests.Response:
    # Session.send, even with allow_redirects=False, reads a redirect's whole body to fill
    # Response.next: no cap, no deadline. Its response hooks run first.
    if response.is_redirect:
        raise _Redirect(response)
    return response


class _Client:
    """Checked settings, and the one transport: send, retry, map errors, read bodies."""

    def __init__(
        self,
        token: str,
        on_behalf_of: Optional[str],
        base_url: str,
        timeout: _Timeout,
        max_retries: int,
        sleep: Callable[[float], None],
    ):
        self.token = _check_token(token)
        self.base_url = _check_base_url(base_url)
        self.origin = _origin(self.base_url)
        self.timeout = _check_timeout(timeout)
        if type(max_retries) is not int or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative integer, not {max_retries!r}")
        self.max_retries = max_retries
        self.sleep = sleep
        self.on_behalf_of = _check_on_behalf_of(on_behalf_of)

    def get_batch(self, session: requests.Session, path: str, batch_id: str) -> Batch:
        batch: Batch
        # Unpacking runs the generator to its end, and so closes the response before returning.
        (batch,) = self._retrying(session, path, "application/json", self._read_batch)
        if batch.id != batch_id:  # a desync or a mixed-up cache must not hand over another batch
            raise InvalidResponseError(
                self._redact(f"response is for batch {batch.id!r}, not {batch_id!r}"),
                field="id",
                request_id=batch.request_id,
            )
        return batch

    def iter_results(
        self,
        session: Optional[requests.Session],
        file_ids: List[str],
        progress: Optional[Callable[["_FileReader"], None]] = None,
    ) -> Iterator[BatchResult]:
        with _session(session) as s:
            for file_id in file_ids:
                reader = _FileReader(self, file_id, progress)
                yield from self._retrying(s, reader.path, "*/*", reader.read, follow=True)

    def _retrying(
        self,
        session: requests.Session,
        path: str,
        accept: str,
        consume: Callable[[requests.Response, float], Iterator[Any]],
        follow: bool = False,
    ) -> Iterator[Any]:
        """Yield what ``consume`` yields from the response, re-requesting what is safe to retry."""
        attempt = 1
        while True:
            started = time.monotonic()
            try:
                with self._open(session, path, accept, attempt, follow) as resp:
                    yield from consume(resp, started + sum(self.timeout))
                return
            except InvalidResponseError as exc:
                # The server's data may echo the key, and the data classes do not know it.
                exc.args = (self._redact(str(exc)),)
                raise
            except (APIConnectionError, APIStatusError) as exc:
                delay = self._retry_delay(exc, attempt)
                if delay is None:
                    raise
                _log.debug("GET %s: retry %d of %d in %.2fs after: %s", path, attempt, self.max_retries, delay, exc)
                self.sleep(delay)
            attempt += 1

    def _retry_delay(self, exc: MKA1Error, attempt: int) -> Optional[float]:
        if attempt > self.max_retries or getattr(exc, "_final", False):
            return None
        if isinstance(exc, APIStatusError):
            if exc.status_code not in _RETRY_STATUSES:
                return None
            if exc.retry_after is not None:
                return exc.retry_after if exc.retry_after <= MAX_RETRY_AFTER else None
        # Exponential backoff with full jitter, so that many clients do not retry in step.
        return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))  # noqa: S311 - not a secret

    def _open(self, session: requests.Session, path: str, accept: str, attempt: int, follow: bool) -> Any:
        """The response to a GET, once its status is 2xx; otherwise raise the status's error."""
        url = self.base_url + path
        ours = True  # the gateway's own origin, until a redirect says otherwise
        for hop in range(_MAX_REDIRECTS + 1):
            resp = self._send(session, url, accept, ours)
            request_id = resp.headers.get("X-Request-ID")
            # The path only: a storage URL's query may hold a signature.
            _log.debug("GET %s -> %d (attempt %d, request %s)", path, resp.status_code, attempt, request_id)
            if 200 <= resp.status_code < 300:
                return resp
            with resp:
                location = resp.headers.get("Location")
                if not (follow and resp.is_redirect) or hop == _MAX_REDIRECTS:
                    raise self._status_error(resp, request_id)
                target = urljoin(url, location)
                refused = _refuse_redirect(url, target)
                if refused:
                    raise self._status_error(resp, request_id, refused)
                url, path = target, urlsplit(target).path
                ours = _origin(url) == self.origin
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _send(self, session: requests.Session, url: str, accept: str, ours: bool) -> requests.Response:
        # The key and the end user's id go to the gateway only, never to storage it redirects to.
        headers = {
            "Accept": accept,
            # Bodies are decoded here, with the caps applied to the decoded size.
            "Accept-Encoding": "identity",
            "User-Agent": _USER_AGENT,
            # None also removes an X-On-Behalf-Of default that the caller's session may carry.
            "X-On-Behalf-Of": self.on_behalf_of if ours else None,
        }
        # The session's response hooks run too: a request's own hooks would replace them.
        hooks = session.hooks.get("response") or []
        hooks = [hooks] if callable(hooks) else list(hooks)
        request = requests.Request(
            "GET",
            url,
            headers,
            auth=_BearerAuth(self.token if ours else None),
            hooks={"response": [*hooks, _stop_at_redirect]},
        )
        try:
            prepared = session.prepare_request(request)
            env = session.merge_environment_settings(url, {}, True, None, None)
            return session.send(
                prepared,
                allow_redirects=False,
                stream=True,
                timeout=self.timeout,
                # A None here would turn certificate checks off; the session's default is True.
                verify=True if env["verify"] is None else env["verify"],
                cert=env["cert"],
                proxies=env["proxies"],
            )
        except _Redirect as stop:
            return stop.response
        except Exception as exc:  # requests, urllib3, or whatever a mounted adapter raises
            raise self._connection_error(exc, url) from exc

    def _read_batch(self, resp: requests.Response, deadline: float) -> Iterator[Batch]:
        request_id = resp.headers.get("X-Request-ID")
        length = _content_length(resp.headers)
        if length is not None and length > MAX_BODY_BYTES:
            raise InvalidResponseError(_too_big(str(length)), request_id=request_id)
        body = self._read_whole(resp, MAX_BODY_BYTES, deadline)
        if len(body) > MAX_BODY_BYTES:
            raise InvalidResponseError(_too_big("more than " + str(MAX_BODY_BYTES)), request_id=request_id)
        try:
            data = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            message = f"response is not JSON: {_excerpt(body)!r}"
            raise InvalidResponseError(message, request_id=request_id) from exc
        try:
            yield Batch.from_dict(data, request_id)
        except InvalidResponseError as exc:
            exc.request_id = request_id  # the data classes do not know it either
            raise

    def _read_whole(self, resp: requests.Response, limit: int, deadline: float) -> bytes:
        """The decoded body, or its first ``limit`` + 1 bytes, read within the deadline."""
        chunks = []
        size = 0
        for chunk in self._body(resp):
            chunks.append(chunk)
            size += len(chunk)
            self._in_time(deadline, resp.url, f"body not read within {sum(self.timeout)}s")
            if size > limit:
                break
        return b"".join(chunks)

    def _body(self, resp: requests.Response) -> Iterator[bytes]:
        """The body as it arrives, decoded; the connection goes back to the pool only once all is read."""
        read = _read1(resp.raw)
        length = _content_length(resp.headers)
        decoder = None
        received = 0
        while True:
            try:
                data = read(_CHUNK)
            except Exception as exc:  # socket, http.client, urllib3, or a stand-in raw's own
                short = length is not None and any("IncompleteRead" in type(e).__name__ for e in _chain(exc))
                cause = f"connection closed after {received} of {length} bytes" if short else None
                raise self._connection_error(exc, resp.url, cause) from exc
            if not data:
                break
            if not received:
                decoder = _decoder(resp, data)
            received += len(data)
            if decoder is None:
                yield data
                continue
            try:
                while data:  # decoded in bounded pieces, so a small bomb is never inflated whole
                    piece = decoder.decompress(data, _CHUNK)
                    data = decoder.unconsumed_tail
                    yield piece
            except zlib.error as exc:
                encoding = resp.headers.get("Content-Encoding")
                message = f"response body is not valid {encoding}: {exc}"
                raise InvalidResponseError(message, request_id=resp.headers.get("X-Request-ID")) from exc
        if decoder is not None:
            yield decoder.flush()
        if length is not None and received < length:
            raise self._connection_error(None, resp.url, f"connection closed after {received} of {length} bytes")
        release = getattr(resp.raw, "release_conn", None)
        if release is not None:
            release()

    def _in_time(self, deadline: float, url: str, what: str) -> None:
        if time.monotonic() > deadline:
            raise self._connection_error(socket.timeout(what), url, what)

    def _status_error(
        self, resp: requests.Response, request_id: Optional[str], refused: str = "not followed"
    ) -> APIStatusError:
        status = resp.status_code
        if status < 200:
            # http.client took an interim 1xx for the final response. The real one is still on
            # the wire: never read it, and never hand this connection back to the pool.
            text = "interim response taken as final; connection closed"
            data: Any = None
        else:
            body = b""
            if not resp.is_redirect:
                # The status says what happened; a body that breaks off adds nothing.
                with contextlib.suppress(APIConnectionError, InvalidResponseError):
                    body = self._read_whole(resp, _ERROR_BODY_BYTES, time.monotonic() + sum(self.timeout))
            text = body[:_ERROR_BODY_BYTES].decode("utf-8", "replace")
            text = self._redact(text).replace(json.dumps(self.token)[1:-1], "[token]")
            try:
                data = json.loads(text) if text else None
            except (ValueError, RecursionError):
                data = text
            location = resp.headers.get("Location")
            if 300 <= status < 400 and location:
                text = f"redirect to {location!r} {refused}"
            else:
                text = _api_message(data) or _html_title(text) or _excerpt(text) or resp.reason or "no message"
                text = re.sub(rf"^{status}\b\W*", "", _excerpt(text)) or "no message"
        message = f"{status} {_excerpt(text)}" + (f" (request {request_id})" if request_id else "")
        return _status_class(status)(
            self._redact(message),
            status_code=status,
            request_id=request_id,
            body=data,
            retry_after=_retry_after(resp.headers.get("Retry-After")),
        )

    def _connection_error(self, exc: Optional[BaseException], url: str, cause: Optional[str] = None) -> MKA1Error:
        chain = _chain(exc)
        status = next((s for s in map(_retry_error_status, chain) if s is not None), None)
        if status is not None:
            # The session's own urllib3 Retry gave up on this status: report it as that status.
            error: MKA1Error = _status_class(status)(
                f"{status} after the session adapter's own retries", status_code=status
            )
            error.__dict__["_final"] = True  # urllib3 has retried already
            return error
        timed_out = any(isinstance(e, _TIMEOUTS) for e in chain)
        final = False
        if cause is None:
            cause, final = _cause(chain)
        what = "timed out" if timed_out else "failed"
        message = f"GET {urlsplit(url).path} on {_host(url)} {what}: {cause}"
        error = (APITimeoutError if timed_out else APIConnectionError)(self._redact(message))
        if final:
            error.__dict__["_final"] = True  # a retry cannot change it
        return error

    def _redact(self, text: str) -> str:
        return text.replace(self.token, "[token]")


class _FileReader:
    """Reads one file's JSONL lines as results, and resumes after a break without repeating one."""

    def __init__(self, client: _Client, file_id: str, progress: Optional[Callable[["_FileReader"], None]]):
        self.client = client
        self.file_id = file_id
        self.path = _FILES + _check_id(file_id, "file id") + "/content"
        self.progress = progress
        #: Lines yielded so far (blank ones included), and the bytes of those lines.
        self.lines = 0
        self.done_bytes = 0
        self.last_line = b""
        #: Bytes read in this attempt, and the body's length when the server gave it.
        self.bytes_read = 0
        self.total: Optional[int] = None

    def read(self, resp: requests.Response, deadline: float) -> Iterator[BatchResult]:
        request_id = resp.headers.get("X-Request-ID")
        # bytes_read counts decoded bytes, so the length of an encoded body is no total for it.
        self.total = _content_length(resp.headers) if _encoding(resp) == "identity" else None
        number = 0
        skipped = 0
        for line in self._lines(resp, deadline):
            number += 1
            if number <= self.lines:  # read before the connection broke: check, and skip
                skipped += len(line) + 1
                if number == self.lines and (skipped, line) != (self.done_bytes, self.last_line):
                    raise self._changed(request_id)
                continue
            self.lines = number
            self.done_bytes += len(line) + 1
            self.last_line = line
            if self.progress is not None:
                self.progress(self)
            if not line.strip():
                continue
            try:
                yield BatchResult.from_dict(json.loads(line.decode("utf-8")))
            except (ValueError, RecursionError) as exc:  # InvalidResponseError is a ValueError too
                field = getattr(exc, "field", None)
                what = str(exc) if field else f"not a JSON object: {_excerpt(line)!r}"
                raise InvalidResponseError(
                    f"file {self.file_id} line {number}: {what}", field=field, request_id=request_id
                ) from exc
        if number < self.lines:
            raise self._changed(request_id)

    def _lines(self, resp: requests.Response, deadline: float) -> Iterator[bytes]:
        """The body's lines, without their newlines, each within the deadline and the size cap."""
        total = sum(self.client.timeout)
        parts: List[bytes] = []
        size = 0
        self.bytes_read = 0
        for chunk in self.client._body(resp):
            self.bytes_read += len(chunk)
            *lines, tail = chunk.split(b"\n")
            for line in lines:
                if parts:
                    line = b"".join([*parts, line])
                    parts, size = [], 0
                self._check_size(len(line), resp)
                yield line
                deadline = time.monotonic() + total  # the time the caller spent is not the server's
            if tail:
                parts.append(tail)
                size += len(tail)
                self._check_size(size, resp)
            self.client._in_time(deadline, resp.url, f"line {self.lines + 1} not read within {total}s")
        if parts:
            yield b"".join(parts)

    def _check_size(self, size: int, resp: requests.Response) -> None:
        if size > MAX_LINE_BYTES:
            raise InvalidResponseError(
                f"file {self.file_id} line {self.lines + 1}: longer than the {MAX_LINE_BYTES}-byte limit",
                request_id=resp.headers.get("X-Request-ID"),
            )

    def _changed(self, request_id: Optional[str]) -> InvalidResponseError:
        message = f"file {self.file_id} changed while it was read again after a broken connection"
        return InvalidResponseError(message, request_id=request_id)


@contextlib.contextmanager
def _session(session: Optional[requests.Session]) -> Iterator[requests.Session]:
    if session is not None:
        yield session
        return
    with requests.Session() as own:
        yield own


def _file_ids(batch: Union[Batch, str], include_errors: bool) -> List[str]:
    if isinstance(batch, str):
        _check_id(batch, "file id")
        return [batch]
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be a Batch or a file id, not {type(batch).__name__}")
    if not batch.is_terminal:
        raise ValueError(
            f"batch {batch.id} is {batch.status}: read its results once it is completed, failed, expired or cancelled"
        )
    ids = [i for i in (batch.output_file_id, batch.error_file_id if include_errors else None) if i is not None]
    for file_id in ids:
        _check_id(file_id, "file id")
    return ids


def _read1(raw: Any) -> Callable[[int], bytes]:
    """A read that returns after one socket read, so that the deadline is checked between reads."""
    # urllib3's read(n) waits for all n bytes: a server dripping a byte per read timeout would hold it.
    if isinstance(raw, urllib3.response.HTTPResponse):
        if not hasattr(raw, "read1"):  # pragma: no cover - urllib3 before 2.2, run by the older CI jobs
            # Then use its http.client response's read1: the one private road in this module.
            fp = getattr(raw, "_fp", None)
            if type(fp) is http.client.HTTPResponse:  # not a subclass: vcrpy's read1 returns nothing
                return fp.read1
            return functools.partial(raw.read, decode_content=False)
        return functools.partial(raw.read1, decode_content=False)
    read: Callable[[int], bytes] = raw.read  # a test adapter's BytesIO, a recorded response
    return read


def _decoder(resp: requests.Response, first: bytes) -> Any:
    """A zlib decoder for a gzip or deflate body, fit to its first bytes; None for an unencoded one."""
    encoding = _encoding(resp)
    if encoding == "identity":
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        # HTTP's deflate has a zlib header; some servers send the raw stream without it.
        zlib_header = len(first) > 1 and (first[0] << 8 | first[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
    raise InvalidResponseError(
        f"response body has an unsupported Content-Encoding {_excerpt(encoding)!r}",
        request_id=resp.headers.get("X-Request-ID"),
    )


def _encoding(resp: requests.Response) -> str:
    return resp.headers.get("Content-Encoding", "").strip().lower() or "identity"


def _chain(exc: Optional[BaseException]) -> List[BaseException]:
    """An exception and what caused it, outermost first: requests and urllib3 wrap in args and reason."""
    chain: List[BaseException] = []
    while exc is not None and exc not in chain and len(chain) < 16:
        chain.append(exc)
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in exc.args if isinstance(a, BaseException)), None)
        exc = inner or exc.__cause__ or exc.__context__
    return chain


def _cause(chain: List[BaseException]) -> Tuple[str, bool]:
    """The root cause of a connection failure in a few words, and whether a retry cannot change it."""
    for e in chain:
        if isinstance(e, ssl.SSLError) and e.reason == "CERTIFICATE_VERIFY_FAILED":
            detail = getattr(e, "verify_message", None)  # Python 3.7 and later
            return "certificate verify failed" + (": " + detail if detail else ""), True
        tunnel = re.search(r"Tunnel connection failed: (\d{3})", str(e))
        if tunnel:
            return "proxy refused CONNECT: " + tunnel.group(1), tunnel.group(1).startswith("4")
    for kind, text in _CAUSES:
        if any(isinstance(e, kind) for e in chain):
            return text, False
    last = chain[-1] if chain else None
    return _excerpt(str(last) or type(last).__name__), False


def _status_class(status: int) -> Type[APIStatusError]:
    return _STATUS_ERRORS.get(status, InternalServerError if 500 <= status < 600 else APIStatusError)


def _retry_error_status(exc: BaseException) -> Optional[int]:
    if isinstance(exc, urllib3.exceptions.ResponseError):
        found = re.search(r"too many (\d{3}) error responses", str(exc))
        return int(found.group(1)) if found else None
    return None


def _refuse_redirect(source: str, target: str) -> Optional[str]:
    try:
        scheme = _origin(target)[0]
    except ValueError:  # a port out of range, or not a number
        return "refused: not a usable URL"
    if scheme not in ("http", "https"):
        return "refused: not an http(s) URL"
    if scheme == "http" and urlsplit(source).scheme == "https":
        return "refused: https to http"
    return None


def _origin(url: str) -> Tuple[str, Optional[str], Optional[int]]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _host(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2]


def _check_token(token: object) -> str:
    if not isinstance(token, str):
        raise TypeError(f"token must be a string, not {type(token).__name__}")
    scheme, _, rest = token.strip().partition(" ")
    token = rest.strip() if scheme.lower() == "bearer" else token.strip()
    # The message never echoes the token, not even a part of it.
    if not _printable_ascii(token):
        raise ValueError("token must be non-empty printable ASCII, with or without a leading 'Bearer '")
    return token


def _check_id(value: object, name: str) -> str:
    """The id quoted as one path segment."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    # An empty batch id would turn the GET into a different endpoint, the list of batches.
    if not value or value in (".", "..") or not value.isprintable():
        raise ValueError(f"{name} must be a non-empty printable string other than . and .., not {value!r}")
    return quote(value, safe="")


def _check_on_behalf_of(value: object) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"on_behalf_of must be a string or None, not {type(value).__name__}")
    if len(value) > 150 or not _printable_ascii(value) or value.strip() != value:
        raise ValueError(f"on_behalf_of must be 1-150 printable ASCII characters, not {_excerpt(repr(value))}")
    return value


def _check_base_url(base_url: object) -> str:
    if isinstance(base_url, str) and base_url.isprintable() and not any(c in base_url for c in "?#"):
        parts = urlsplit(base_url)
        with contextlib.suppress(ValueError):  # a port out of range, or not a number
            if parts.scheme in ("http", "https") and parts.hostname and parts.port != 0:
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


def _path(where: str, key: str) -> str:
    return key if where in ("batch", "file", "result") else where + "." + key


def _invalid(field: str, expected: str, value: Any) -> InvalidResponseError:
    if value is None:
        got = "null"
    elif isinstance(value, (str, int)):
        got = repr(value)
    else:
        got = type(value).__name__
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


def _html_title(text: str) -> Optional[str]:
    found = re.search(r"<title[^>]*>([^<]*)</title>", text, re.IGNORECASE)
    return found.group(1) if found and found.group(1).strip() else None


def _excerpt(text: Union[str, bytes]) -> str:
    """One short line: markup dropped, white space folded, cut at _EXCERPT characters."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(re.sub(r"<[^>]*>", " ", text).split())
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 1] + "…"


def _content_length(headers: Any) -> Optional[int]:
    """Content-Length, if it is plain ASCII digits and no Transfer-Encoding overrides it (RFC 9112)."""
    length = headers.get("Content-Length")
    if length is None or "Transfer-Encoding" in headers or not re.fullmatch("[0-9]+", length):
        return None
    return int(length) if len(length) <= 18 else 10**18  # past every cap; int() refuses 4300 digits


def _too_big(size: str) -> str:
    return f"response body of {size} bytes is over the {MAX_BODY_BYTES}-byte limit"


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds to wait, as urllib3 reads Retry-After: digits, else an HTTP date, else None."""
    if value is None:
        return None
    if re.fullmatch("[0-9]+", value.strip()):
        return float(value)
    date = email.utils.parsedate_tz(value)  # a date with no zone comes back as GMT
    if date is None:
        return None
    return max(0.0, email.utils.mktime_tz(date) - time.time())


def _printable(text: str) -> str:
    """``text`` safe to show on a terminal: control characters, which a server could send, become ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _columns(stream: Any) -> int:
    """The width of the terminal ``stream`` writes to; 80 when it cannot be read."""
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):  # not a real file, as under pytest's capture
        return 80


def _redraw(stream: Any, text: str, end: str = "") -> None:
    """Replace the terminal's current line with ``text``, cut to fit.

    One column short of the edge: a full line wraps on some terminals, and \\r would then
    return only to the start of the wrapped part, leaving the rest behind.
    """
    stream.write("\r\x1b[K" + text[: _columns(stream) - 1] + end)
    stream.flush()


class _Progress:
    """``--wait``'s status on stderr: on a terminal one line redrawn every second, else a line per change."""

    def __init__(self) -> None:
        import sys
        import threading

        self._stream = sys.stderr
        self._tty = self._stream.isatty()
        self._started = time.monotonic()
        self._batch: Optional[Batch] = None
        self._lock = threading.Lock()  # the ticker and update() take turns at the line
        self._done = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self) -> "_Progress":
        if self._tty:
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._tty:
            self._ticker.join()
            with self._lock:
                if self._batch is not None:
                    self._draw(self._batch, "\n")  # redrawn whole: also wipes a ^C the terminal echoed

    def update(self, batch: Batch) -> None:
        """The ``on_update`` for wait_for_batch."""
        with self._lock:
            self._batch = batch
            self._draw(batch)

    def _tick(self) -> None:
        # wait_for_batch reports changes only; in between, this keeps the elapsed time moving.
        while not self._done.wait(1 - (time.monotonic() - self._started) % 1):
            with self._lock:
                if self._batch is not None:
                    self._draw(self._batch)

    def _draw(self, batch: Batch, end: str = "") -> None:
        counts = batch.request_counts
        status = _printable(f"{batch.status}: {counts.completed}/{counts.total} completed, {counts.failed} failed")
        seconds = int(time.monotonic() - self._started)
        if not self._tty:
            self._stream.write(f"{status}, {seconds}s\n")
            self._stream.flush()
        else:
            # The elapsed time first, so that a narrow terminal still shows the wait is alive.
            _redraw(self._stream, f"{seconds}s {status}", end)


class _ReadProgress:
    """``--results``' progress while a file streams: lines and MiB read, redrawn on a terminal's stderr.

    Shown only when stderr is a terminal and stdout is not: results written to that same
    terminal would land in the middle of the line. Drawn at most 10 times a second, and only
    for a file that takes longer than that; wiped when reading ends, however it ends.
    """

    INTERVAL = 0.1

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        import sys

        self._stream = sys.stderr
        self.shown = self._stream.isatty() and not sys.stdout.isatty()
        self._clock = clock
        self._reader: Optional[_FileReader] = None
        self._next = 0.0
        self._drawn = False

    def __enter__(self) -> "_ReadProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()

    def update(self, reader: "_FileReader") -> None:
        """The progress hook of _Client.iter_results, called once per line."""
        now = self._clock()
        if reader is not self._reader:  # a new file: its first draw waits like any other
            self._reader = reader
            self._next = now + self.INTERVAL
        elif now >= self._next:
            self._next = now + self.INTERVAL
            self._drawn = True
            _redraw(self._stream, self.line(reader))

    @staticmethod
    def line(reader: "_FileReader") -> str:
        """``file-abc: 1234 lines, 1.2 of 256.0 MiB``; the total only when the server sent a length.

        A gzip-encoded file's Content-Length counts encoded bytes, which the decoded ones read
        overtake: then the total is left out rather than shown smaller than what was read.
        """
        read = f"{reader.bytes_read / 2**20:.1f}"
        if reader.total is not None and reader.bytes_read <= reader.total:
            read += f" of {reader.total / 2**20:.1f}"
        return _printable(f"{reader.file_id}: {reader.lines} lines, {read} MiB")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m mka1_batches``: print a batch as JSON, or its results as JSON lines; see ``--help``."""
    import argparse
    import os
    import platform
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m mka1_batches",
        description="Print an MKA1 batch as JSON on stdout, or with --results its results as JSON lines;"
        " with --wait, wait for it to finish first.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_CLI_EPILOG,
    )
    versions = f"requests {requests.__version__}, Python {platform.python_version()}"
    parser.add_argument("--version", action="version", version=f"mka1-batches {__version__} ({versions})")
    parser.add_argument("batch_id")
    parser.add_argument("--on-behalf-of", metavar="ID", help="the end user to act for (X-On-Behalf-Of)")
    parser.add_argument("--base-url", metavar="URL", help=f"default: $MKA1_BASE_URL, else {DEFAULT_BASE_URL}")
    parser.add_argument("--timeout", metavar="S", type=float, help="connect and read timeout (default: 10, 30)")
    parser.add_argument("--wait", action="store_true", help="poll until the batch reaches a terminal status")
    parser.add_argument("--poll-interval", metavar="S", type=float, help="with --wait: seconds between polls (2)")
    parser.add_argument("--max-wait", metavar="S", type=float, help="with --wait: give up after S seconds (exit 4)")
    parser.add_argument(
        "--results", action="store_true", help="write the finished batch's results, one JSON object per line"
    )
    args = parser.parse_args(argv)
    # Refused rather than taken to imply --wait: that would also change what exit 0 means.
    for option, value in (("--poll-interval", args.poll_interval), ("--max-wait", args.max_wait)):
        if value is not None and not args.wait:
            parser.error(f"argument {option}: not allowed without --wait")

    token = os.environ.get("MKA1_API_KEY") or os.environ.get("MKA1_BEARER_AUTH") or ""
    if not token.strip():
        print("error: set MKA1_API_KEY (or MKA1_BEARER_AUTH) to your MKA1 API key", file=sys.stderr)
        return 2
    base_url = args.base_url or os.environ.get("MKA1_BASE_URL") or DEFAULT_BASE_URL
    timeout: _Timeout = DEFAULT_TIMEOUT if args.timeout is None else args.timeout
    try:
        try:
            # One session, so one kept-alive connection, from the first poll to the last result.
            with requests.Session() as session:
                options: Dict[str, Any] = {"base_url": base_url, "timeout": timeout, "session": session}
                if args.wait:
                    with _Progress() as progress:
                        batch = wait_for_batch(
                            token,
                            args.batch_id,
                            args.on_behalf_of,
                            poll_interval=2.0 if args.poll_interval is None else args.poll_interval,
                            max_wait=args.max_wait,
                            on_update=progress.update,
                            **options,
                        )
                else:
                    batch = get_batch(token, args.batch_id, args.on_behalf_of, **options)
                if not args.results:
                    print(json.dumps(batch.to_dict(), indent=2))
                elif not batch.is_terminal:
                    status = _printable(batch.status)
                    print(f"error: batch {args.batch_id} is {status}, not finished: add --wait", file=sys.stderr)
                    return 4
                else:
                    # The public iter_results has no progress hook; this module's CLI may use the one inside.
                    client = _Client(token, args.on_behalf_of, base_url, timeout, 2, _sleep)
                    try:
                        file_ids = _file_ids(batch, True)
                    except ValueError as exc:  # a file id no path can hold: the server's fault, not the user's
                        raise InvalidResponseError(f"batch {batch.id}: {exc}", request_id=batch.request_id) from exc
                    with _ReadProgress() as shown:
                        hook = shown.update if shown.shown else None
                        results: Any = client.iter_results(session, file_ids, hook)  # a generator
                        with contextlib.closing(results):  # a reader gone early: the download stops here
                            for result in results:
                                sys.stdout.write(json.dumps(result.to_dict(), separators=(",", ":")) + "\n")
        except KeyboardInterrupt:
            # On a terminal, first wipe the ^C it echoed.
            print(("\r\x1b[K" if sys.stderr.isatty() else "") + "error: interrupted", file=sys.stderr)
            sys.stdout.flush()
            return 130
        except (MKA1Error, ValueError) as exc:
            # One line, never a traceback. No message holds the token: get_batch redacts its own.
            print("error: " + _printable(" ".join(str(exc).split())), file=sys.stderr)
            sys.stdout.flush()  # the results before a bad line, or a broken connection, are kept
            if isinstance(exc, WaitTimeoutError):
                return 4
            return 1 if isinstance(exc, MKA1Error) else 2
        sys.stdout.flush()  # here, not at exit, so that a reader gone early is caught below
        return 0 if not (args.wait or args.results) or batch.status == "completed" else 3
    except BrokenPipeError:  # pragma: no cover - the tests run this in subprocesses, over real pipes
        # The reader stopped reading, as `| head -n1` does: no traceback, no error line. The
        # Python docs' recipe: point the streams at devnull, so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover - run as a subprocess by the tests
    raise SystemExit(main())
