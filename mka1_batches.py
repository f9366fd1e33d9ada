# SPDX-License-Identifier: MIT
# Copyright (c) 2026 the mka1-batches authors. From the mka1-batches project; see its LICENSE.
"""A client for MKA1 batches (MeetKai's LLM gateway): check and upload an input file, create the batch
exactly once, wait for it, read its results, list and cancel batches, and resubmit what failed.

    >>> import mka1_batches
    >>> with mka1_batches.Client(api_key) as client:
    ...     batch = client.submit_batch("requests.jsonl", "/v1/chat/completions")
    ...     batch = client.wait_for_batch(batch)  # a Batch, or its id
    ...     for result in client.iter_results(batch):
    ...         print(result.custom_id, result.error or result.response.status_code)

From a shell: ``MKA1_API_KEY=... python -m mka1_batches submit requests.jsonl --endpoint EP --wait --results``.
One file, two dependencies (requests and attrs): copy it into your tree as it is.

The sections, in order: constants; errors; the data classes (Batch, File, BatchResult and
their parts); the module functions, each a few lines over a Client; check_batch_file; Client,
whose public methods document each operation, with the lookups and pages that make a write
happen once; _Transport, the one road of every request (sending, bodies, the retry loop, the
key kept out), and its parts (the retry policy, _Failure, auth, the multipart body); checks and
helpers; the command line (_Output, the modes), and main.
"""

if __name__ == "__main__":  # pragma: no cover - run as a program by the tests
    # Run as a program (python -m mka1_batches, python mka1_batches.py), a Ctrl-C that Python acts on
    # from the `try` below until main() has returned ends the run with exit 130 and one line on stderr,
    # "error: interrupted" (on a terminal, the line wiped first), never a traceback: in this module's
    # imports and definitions, in main(), at any moment. After that it is ignored: the run's own exit
    # code stands. Python acts on a signal between two instructions of the main thread, and one it acts
    # on earlier is its own, a traceback and death by SIGINT: while the interpreter starts, while runpy
    # finds and reads this file, and in this file's first instructions, above the `try`. A SIGINT
    # ignored when the program started, as in a background job, stays ignored.

    def _exit_interrupted(signum: object = None, frame: object = None) -> None:
        """Exit 130 with the one line: written to the file descriptor, as a handler may run mid-write."""
        import os

        try:
            os.write(2, (b"\r\x1b[K" if os.isatty(2) else b"") + b"error: interrupted\n")
        finally:  # even if stderr is closed
            os._exit(130)

    try:
        # The C module that `signal` wraps, loaded as Python starts: no import runs here, whose
        # clean-up could run a callback in which a KeyboardInterrupt would be printed and lost.
        import _signal as signal  # type: ignore[import-not-found]

        if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
            signal.signal(signal.SIGINT, _exit_interrupted)  # until main() takes over, at the end of the file
    except KeyboardInterrupt:
        _exit_interrupted()

import contextlib
import errno
import functools
import hashlib
import http.client
import itertools
import json
import logging
import os
import random
import re
import socket
import ssl
import time
import zlib
from typing import (
    Any,
    BinaryIO,
    Callable,
    Dict,
    Generator,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Set,
    Tuple,
    Type,
    TypeVar,
    Union,
)
from urllib.parse import quote, urljoin, urlsplit

import attr
import requests
import urllib3

__all__ = [
    "CREATE_KEY",
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "ENDPOINTS",
    "MAX_BODY_BYTES",
    "MAX_LINE_BYTES",
    "MAX_RETRY_AFTER",
    "RESUBMIT_KEY",
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
    "Client",
    "ConflictError",
    "File",
    "IdempotencyKeyError",
    "InternalServerError",
    "InvalidBatchFileError",
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
    "cancel_batch",
    "check_batch_file",
    "create_batch",
    "get_batch",
    "iter_file",
    "iter_results",
    "list_batches",
    "main",
    "resubmit_failed",
    "submit_batch",
    "upload_file",
    "wait_for_batch",
]

__version__ = "2.0.0"

#: The production gateway; self-hosted and staging gateways use their own.
DEFAULT_BASE_URL = "https://apigw.mka1.com"
#: Seconds to connect, and to wait for each read from the socket.
DEFAULT_TIMEOUT = (10.0, 30.0)
#: The endpoints a batch may name, as MKA1 documents them; others are refused before any upload. To use
#: one newer than this copy knows, add it first: ``mka1_batches.ENDPOINTS += ("/v1/new",)``.
ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/images/generations")
#: Statuses after which a batch never changes again.
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
#: A batch body larger than this, once decoded, is refused.
MAX_BODY_BYTES = 10 * 1024 * 1024
#: A result line longer than this is refused; an image-generation line holds several MB of base64.
MAX_LINE_BYTES = 64 * 1024 * 1024
#: A Retry-After longer than this (seconds) is raised to the caller, not slept.
MAX_RETRY_AFTER = 60.0
#: The metadata key a create is marked with, its idempotency key or a value new to the call: a
#: lookup after a lost answer, or a rerun, finds the batch by it.
CREATE_KEY = "mka1_batches_create"
#: The metadata key of a batch made by resubmit_failed: the id of the batch it came from.
RESUBMIT_KEY = "mka1_batches_resubmit_of"

_T = TypeVar("_T")
_Listed = TypeVar("_Listed", "Batch", "File")
_Timeout = Union[float, Tuple[float, float]]
#: A path (str or os.PathLike) or a binary file object open for reading.
_Input = Union[str, "os.PathLike[str]", BinaryIO]
# A status that may pass: a read is sent again after it, and resubmit_failed sends its requests again.
# Not 501 (Not Implemented) nor 505 and up: the same request would get the same answer.
_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# After these the server may have acted: a write looks before it is sent again.
_AMBIGUOUS_STATUSES = frozenset({500, 502, 503, 504})
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0
# An error body is cut here rather than refused, so that a huge 502 page is still a 502.
_ERROR_BODY_BYTES = 64 * 1024
# The most a body read hands over at once, before and after decoding.
_CHUNK = 64 * 1024
# File content may be redirected to storage; a batch never is.
_MAX_REDIRECTS = 3
_EXCERPT = 200
_BATCHES = "/api/v1/llm/batches"
_FILES = "/api/v1/llm/files"
# An upload is read and sent in pieces of this size.
_UPLOAD_CHUNK = 1024 * 1024
# How far apart the gateway's own clocks may be (its front's Date, its store's created_at), whole seconds
# included: a lookup for what a call made reads back this much further than the call's start.
_GATEWAY_SKEW = 300.0
# A file that expires sooner than this after the gateway's Date is not reused: a batch made from it could be refused.
_FILE_MARGIN = 3600.0
_USER_AGENT = f"mka1-batches/{__version__} python-requests/{requests.__version__}"
# What a connection error's chain holds when the request never left: no retry can make a second write.
_UNSENT = (
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ConnectTimeoutError,
    requests.ConnectTimeout,
    ConnectionRefusedError,
    socket.gaierror,
)
# What a connection error's chain holds when it timed out. Not urllib3's TimeoutError: its
# NewConnectionError, a refused connection, is one.
_TIMEOUTS = (requests.Timeout, socket.timeout, urllib3.exceptions.ReadTimeoutError)
_PROXY_ERRORS = (requests.exceptions.ProxyError, urllib3.exceptions.ProxyError)
# A connection error's root cause, in a few words, by the first of these its chain holds.
_CAUSES: List[Tuple[Any, str]] = [
    (ConnectionRefusedError, "connection refused"),
    (socket.gaierror, "name resolution failed"),
    (requests.ConnectTimeout, "connect timed out"),
    ((requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, socket.timeout), "read timed out"),
    (http.client.RemoteDisconnected, "connection closed without a response"),  # a ConnectionResetError too
    (ConnectionResetError, "connection reset"),
]
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


class ConflictError(APIStatusError):
    """409: the request conflicts with the resource's state, such as cancelling a finished batch."""


class InvalidBatchFileError(MKA1Error, ValueError):
    """A batch input file that the gateway would refuse; ``line`` is 1-based, or None for the whole file."""

    def __init__(self, message: str, *, line: Optional[int]):
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line


class IdempotencyKeyError(MKA1Error, ValueError):
    """An idempotency key that already names a batch made from other input; ``batch`` is that batch."""

    def __init__(self, message: str, batch: "Batch"):
        super().__init__(message)
        self.batch = batch


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
    409: ConflictError,
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
    def from_dict(cls: Type[_M], data: Any, request_id: Optional[str] = None) -> _M:
        """Build from the JSON object; raise InvalidResponseError naming what breaks the spec.

        :param request_id: the X-Request-ID of the response it came in, for the error to carry.
        """
        try:
            return cls._build(data, cls._where)
        except InvalidResponseError as exc:
            exc.request_id = request_id
            raise

    @classmethod
    def _build(cls: Type[_M], data: Any, where: str) -> _M:
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
    return tuple(BatchError._build(item, f"{path}[{i}]") for i, item in enumerate(value))


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
    #: None while the batch validates, and for good on one that never ran (OpenAI-compatible servers).
    request_counts: Optional[RequestCounts] = attr.ib(default=None, metadata={"kind": RequestCounts._build})
    errors: Optional[BatchErrors] = attr.ib(default=None, metadata={"kind": BatchErrors._build})
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
        """Build from the JSON object; raise InvalidResponseError naming what breaks the spec.

        :param request_id: the X-Request-ID of the response it came in, kept on it (or on the error).
        """
        batch = super().from_dict(data, request_id)
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
    response: Optional[ResultResponse] = attr.ib(default=None, metadata={"kind": ResultResponse._build})
    error: Optional[ResultError] = attr.ib(default=None, metadata={"kind": ResultError._build})
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
    batch_id: Union[Batch, str],
    on_behalf_of: Optional[str] = None,
    *,
    base_url: Optional[str] = None,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> Batch:
    """Fetch one batch by id: :meth:`Client.get_batch`, with the settings of :class:`Client`."""
    with Client(token, on_behalf_of, base_url=base_url, timeout=timeout, max_retries=max_retries, session=session) as c:
        return c.get_batch(batch_id)


def wait_for_batch(
    token: str,
    batch_id: Union[Batch, str],
    on_behalf_of: Optional[str] = None,
    *,
    poll_interval: float = 2.0,
    max_wait: Optional[float] = None,
    on_update: Optional[Callable[[Batch], None]] = None,
    base_url: Optional[str] = None,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> Batch:
    """Poll a batch until it is terminal: :meth:`Client.wait_for_batch`."""
    with Client(token, on_behalf_of, base_url=base_url, timeout=timeout, max_retries=max_retries, session=session) as c:
        return c.wait_for_batch(batch_id, poll_interval=poll_interval, max_wait=max_wait, on_update=on_update)


def iter_results(
    token: str,
    batch: Union[Batch, str],
    on_behalf_of: Optional[str] = None,
    *,
    include_errors: bool = True,
    on_progress: Optional[Callable[[str, int, int, Optional[int]], None]] = None,
    base_url: Optional[str] = None,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> Iterator[BatchResult]:
    """Yield a finished batch's results, one per line: :meth:`Client.iter_results`."""
    client = Client(token, on_behalf_of, base_url=base_url, timeout=timeout, max_retries=max_retries, session=session)
    return _owned(client, lambda c: c.iter_results(batch, include_errors=include_errors, on_progress=on_progress))


def iter_file(
    token: str,
    file_id: str,
    on_behalf_of: Optional[str] = None,
    *,
    on_progress: Optional[Callable[[str, int, int, Optional[int]], None]] = None,
    base_url: Optional[str] = None,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> Iterator[BatchResult]:
    """Yield one file's lines as results, by its id: :meth:`Client.iter_file`."""
    client = Client(token, on_behalf_of, base_url=base_url, timeout=timeout, max_retries=max_retries, session=session)
    return _owned(client, lambda c: c.iter_file(file_id, on_progress=on_progress))


def upload_file(
    token: str,
    file: _Input,
    on_behalf_of: Optional[str] = None,
    *,
    purpose: str = "batch",
    base_url: Optional[str] = None,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> "File":
    """Upload a file once, streamed: :meth:`Client.upload_file`."""
    with Client(token, on_behalf_of, base_url=base_url, timeout=timeout, max_retries=max_retries, session=session) as c:
        return c.upload_file(file, purpose=purpose)


def create_batch(
    token: str,
    input_file_id: str,
    endpoint: str,
    on_behalf_of: Optional[str] = None,
    *,
    completion_window: str = "24h",
    metadata: Optional[Dict[str, str]] = None,
    max_concurrency: Optional[int] = None,
    idempotency_key: Optional[str] = None,
    base_url: Optional[str] = None,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> Batch:
    """Create a batch exactly once: :meth:`Client.create_batch`."""
    with Client(token, on_behalf_of, base_url=base_url, timeout=timeout, max_retries=max_retries, session=session) as c:
        return c.create_batch(
            input_file_id,
            endpoint,
            completion_window=completion_window,
            metadata=metadata,
            max_concurrency=max_concurrency,
            idempotency_key=idempotency_key,
        )


def submit_batch(
    token: str,
    file: _Input,
    endpoint: str,
    on_behalf_of: Optional[str] = None,
    *,
    completion_window: str = "24h",
    metadata: Optional[Dict[str, str]] = None,
    max_concurrency: Optional[int] = None,
    idempotency_key: Optional[str] = None,
    base_url: Optional[str] = None,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> Batch:
    """Check, upload and create: :meth:`Client.submit_batch`."""
    with Client(token, on_behalf_of, base_url=base_url, timeout=timeout, max_retries=max_retries, session=session) as c:
        return c.submit_batch(
            file,
            endpoint,
            completion_window=completion_window,
            metadata=metadata,
            max_concurrency=max_concurrency,
            idempotency_key=idempotency_key,
        )


def resubmit_failed(
    token: str,
    batch: Union[Batch, str],
    on_behalf_of: Optional[str] = None,
    *,
    metadata: Optional[Dict[str, str]] = None,
    on_kept: Optional[Callable[[BatchResult], None]] = None,
    base_url: Optional[str] = None,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> Optional[Batch]:
    """Send what failed in a finished batch again, as a new batch: :meth:`Client.resubmit_failed`."""
    with Client(token, on_behalf_of, base_url=base_url, timeout=timeout, max_retries=max_retries, session=session) as c:
        return c.resubmit_failed(batch, metadata=metadata, on_kept=on_kept)


def list_batches(
    token: str,
    on_behalf_of: Optional[str] = None,
    *,
    page_size: int = 20,
    after: Optional[str] = None,
    limit: Optional[int] = None,
    base_url: Optional[str] = None,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> Iterator[Batch]:
    """Yield this user's batches, newest first: :meth:`Client.list_batches`."""
    client = Client(token, on_behalf_of, base_url=base_url, timeout=timeout, max_retries=max_retries, session=session)
    return _owned(client, lambda c: c.list_batches(page_size=page_size, after=after, limit=limit))


def cancel_batch(
    token: str,
    batch_id: Union[Batch, str],
    on_behalf_of: Optional[str] = None,
    *,
    base_url: Optional[str] = None,
    timeout: _Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 2,
    session: Optional[requests.Session] = None,
) -> Batch:
    """Cancel a batch: :meth:`Client.cancel_batch`."""
    with Client(token, on_behalf_of, base_url=base_url, timeout=timeout, max_retries=max_retries, session=session) as c:
        return c.cancel_batch(batch_id)


def check_batch_file(file: _Input, endpoint: str) -> int:
    """The number of requests in a batch input file, read once and streamed; no I/O but the file.

    :param file: a path, or a binary file object open for reading (read from where it stands,
        and put back there).
    :param endpoint: the batch's endpoint, which every line's ``url`` must be.
    :raises InvalidBatchFileError: naming the first line that is wrong, and what is wrong with it.
    """
    _check_endpoint(endpoint)
    with _opened(file) as (stream, _):
        return len(_scan(stream, endpoint)[0])


class Client:
    """The settings of every call, checked once, and one Session: safe to share between threads.

        >>> with mka1_batches.Client(api_key) as client:
        ...     batch = client.submit_batch("requests.jsonl", "/v1/chat/completions")

    :param token: the MKA1 API key, with or without a leading ``Bearer ``.
    :param on_behalf_of: the end user calls act for (``X-On-Behalf-Of``); a call may name another.
    :param base_url: the gateway; None reads ``MKA1_BASE_URL`` now, else DEFAULT_BASE_URL.
    :param timeout: seconds, or ``(connect, read)``; always sent. An attempt also ends once their
        sum has passed, while connecting or reading the body. The status line and headers are
        bounded only by the read timeout per socket read and http.client's own line-length and
        header-count limits.
    :param max_retries: retries after what may pass: for reads, connection errors, timeouts,
        408, 429, 500, 502, 503 and 504; for writes, see each. A urllib3 ``Retry`` mounted on the session's
        adapter runs first, inside each attempt.
    :param session: a ``requests.Session`` to use; it is not changed, and :meth:`close` leaves it
        open. Without one, the Client makes its own and closes it.

    Every method raises, besides what it names:
    :raises APIStatusError: a status other than 2xx, as the subclass for that status.
    :raises APIConnectionError: the gateway could not be reached in time, or the connection broke.
    :raises InvalidResponseError: a 2xx body that is not what the call returns.
    :raises ValueError, TypeError: a bad argument, before any I/O.
    """

    def __init__(
        self,
        token: str,
        on_behalf_of: Optional[str] = None,
        *,
        base_url: Optional[str] = None,
        timeout: _Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        session: Optional[requests.Session] = None,
    ):
        token = _check_token(token)
        if base_url is None:
            base_url = os.environ.get("MKA1_BASE_URL") or DEFAULT_BASE_URL
        self.base_url = _check_base_url(base_url)
        self.timeout = _check_timeout(timeout)
        if type(max_retries) is not int or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative integer, not {max_retries!r}")
        self.max_retries = max_retries
        self.on_behalf_of = _check_on_behalf_of(on_behalf_of)
        self._own = session is None
        self.session = requests.Session() if session is None else session
        self._transport = _Transport(token, self.base_url, self.timeout, max_retries, self.session)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mka1_batches.Client {self.base_url} on_behalf_of={self.on_behalf_of!r}>"

    def close(self) -> None:
        """Close the Session this Client made, and its connections; one it was given stays open."""
        if self._own:
            _close_pools(self.session)
            self.session.close()

    def get_batch(self, batch_id: Union[Batch, str], *, on_behalf_of: Optional[str] = None) -> Batch:
        """Fetch a batch as it is now, by its id (such as ``batch_aa87e2b1112a455b8deabed784372198``) or a Batch.

        :raises InvalidResponseError: also for another batch than the one asked for.
        """
        return self._get(_batch_id(batch_id, "batch_id"), self._user(on_behalf_of))

    def wait_for_batch(
        self,
        batch_id: Union[Batch, str],
        *,
        poll_interval: float = 2.0,
        max_wait: Optional[float] = None,
        on_update: Optional[Callable[[Batch], None]] = None,
        on_behalf_of: Optional[str] = None,
    ) -> Batch:
        """Poll a batch until its status is terminal and return it, whatever the outcome.

        :param batch_id: its id, or a Batch.
        :param poll_interval: seconds between polls.
        :param max_wait: seconds; no sleep, between polls or before a retry, runs past them. Once
            they have passed, raise WaitTimeoutError with the last Batch seen; the batch goes on.
            A request in flight may still take up to its own timeout.
        :param on_update: called with the first Batch, then whenever status or counts change.
        :raises WaitTimeoutError: ``max_wait`` passed first.
        """
        if not _positive(poll_interval):
            raise ValueError(f"poll_interval must be a positive number of seconds, not {poll_interval!r}")
        if max_wait is not None and not _positive(max_wait):
            raise ValueError(f"max_wait must be None or a positive number of seconds, not {max_wait!r}")
        batch_id = _batch_id(batch_id, "batch_id")
        who = self._user(on_behalf_of)
        deadline = None if max_wait is None else time.monotonic() + max_wait
        last: Optional[Batch] = None

        def sleep(seconds: float) -> None:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "nothing seen yet" if last is None else f"last status {last.status!r}"
                    message = f"batch {batch_id} did not reach a terminal status in {max_wait:g}s ({seen}); it goes on"
                    raise WaitTimeoutError(message, last)
                seconds = min(seconds, left)
            _sleep(seconds)

        while True:
            batch = self._get(batch_id, who, sleep)
            changed = last is None or (batch.status, batch.request_counts) != (last.status, last.request_counts)
            if on_update is not None and changed:
                on_update(batch)
            last = batch
            if batch.is_terminal:
                return batch
            sleep(poll_interval)

    def iter_results(
        self,
        batch: Union[Batch, str],
        *,
        include_errors: bool = True,
        on_progress: Optional[Callable[[str, int, int, Optional[int]], None]] = None,
        on_behalf_of: Optional[str] = None,
    ) -> Iterator[BatchResult]:
        """Yield a finished batch's results, one per line: its output file's, then its error file's.

        Not in input order: match them by ``custom_id``. The file streams: memory does not grow
        with its size. A connection that breaks mid-file is re-requested, and the lines already
        yielded are skipped. Errors are raised as the iteration reaches them, after the results
        before them.

        :param batch: a terminal Batch (a cancelled or expired one yields its partial results), or
            a batch's id (fetched first). To read one file by its id, see :meth:`iter_file`.
        :param include_errors: also yield the lines of the batch's ``error_file_id``.
        :param on_progress: called after each line with the file id, the lines read, the bytes
            read (decoded) and the file's length when the server sent it.
        :raises InvalidResponseError: a malformed line or one over MAX_LINE_BYTES (naming the file
            and the line), or a file that changed while it was read again.
        :raises ValueError: also for a batch that has not finished, or a file id.
        """
        pairs = self.iter_result_lines(
            batch, include_errors=include_errors, on_progress=on_progress, on_behalf_of=on_behalf_of
        )
        return (result for _, result in pairs)

    def iter_result_lines(
        self,
        batch: Union[Batch, str],
        *,
        include_errors: bool = True,
        on_progress: Optional[Callable[[str, int, int, Optional[int]], None]] = None,
        on_behalf_of: Optional[str] = None,
    ) -> Iterator[Tuple[bytes, BatchResult]]:
        """As :meth:`iter_results`, each result beside its line as the server sent it (without its CRLF or LF)."""
        who = self._user(on_behalf_of)
        batch = self._finished(batch, who)
        files = [("output", batch.output_file_id), ("error", batch.error_file_id if include_errors else None)]
        return (
            pair
            for kind, file_id in files
            if file_id is not None
            for pair in self._file_lines(file_id, who, on_progress, BatchResult.from_dict, f"{kind} file", batch)
        )

    def iter_file(
        self,
        file_id: str,
        *,
        on_progress: Optional[Callable[[str, int, int, Optional[int]], None]] = None,
        on_behalf_of: Optional[str] = None,
    ) -> Iterator[BatchResult]:
        """Yield the lines of one file as results, such as an output file, by its id: see :meth:`iter_results`."""
        _check_id(file_id, "file_id")
        lines = self._file_lines(file_id, self._user(on_behalf_of), on_progress, BatchResult.from_dict, "file", None)
        return (result for _, result in lines)

    def upload_file(self, file: _Input, *, purpose: str = "batch", on_behalf_of: Optional[str] = None) -> "File":
        """Upload a file, streamed from disk with its length up front, and never the same bytes twice.

        A file of this user with this purpose, the same sha256 and the same size, and not about to
        expire (by the gateway's clock), is returned instead of uploading again. After a failure
        that leaves unknown whether the gateway stored the file (a broken connection or a timeout
        after it was sent, 500, 502, 503, 504), it waits, looks again (by sha256, or where the
        gateway gives none, by name and size among the files it made since this call began), and
        uploads again only if it is not there.

        :param file: a path, or a seekable binary file object (read from where it stands).
        """
        if not isinstance(purpose, str) or not purpose.strip() or not purpose.isprintable():
            raise ValueError(f"purpose must be a non-empty string such as 'batch', not {purpose!r}")
        who = self._user(on_behalf_of)
        with _opened(file) as (stream, name):
            size, digest = _digest(stream)
            return self._upload(stream, name, purpose, who, size, digest)

    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        *,
        completion_window: str = "24h",
        metadata: Optional[Dict[str, str]] = None,
        max_concurrency: Optional[int] = None,
        idempotency_key: Optional[str] = None,
        on_behalf_of: Optional[str] = None,
    ) -> Batch:
        """Create a batch: one call makes at most one batch, whatever fails on the way.

        The request carries ``metadata[CREATE_KEY]``: ``idempotency_key``, or a value new to this
        call. After a failure that leaves unknown whether the gateway made the batch (a broken
        connection or a timeout after it was sent, 500, 502, 503, 504), the call waits, looks for
        the batch that carries it, returns it if there is one, else sends again. 408 and 429 are
        retried; other 4xx are raised at once. Without a key, the lookup reads the user's batches
        made since the call began, by the gateway's clock (its ``Date``, less the time the call
        has taken); with one, all of them. When ``metadata`` already has 16 pairs there is no room
        for the value: such a failure is then raised (``list_batches`` shows whether the batch was
        made). A gateway that makes the batch only after the lookup has looked could still make a
        second: nothing a client can see tells the two apart.

        :param metadata: up to 16 pairs of strings, kept on the batch (15 with a key).
        :param max_concurrency: how many of its requests may run at once; sent only when given.
        :param idempotency_key: your name for this one create, 1 to 64 printable ASCII characters,
            such as ``nightly-2026-12-04``. A batch of this user that already carries it is
            returned, and nothing is sent, if it was made from this file id for this endpoint:
            a rerun after a crash finds what the first run made. Two calls at once with one key
            may still both make a batch: a key guards a rerun, not a race.
        :raises IdempotencyKeyError: the key names a batch made from another file or endpoint.
        """
        who = self._user(on_behalf_of)
        _check_id(input_file_id, "input_file_id")
        body = _create_body(input_file_id, endpoint, completion_window, metadata, max_concurrency, idempotency_key)
        if idempotency_key is not None:
            found = self._find_batch(who, idempotency_key)
            if found is not None:
                same = (found.input_file_id, found.endpoint) == (input_file_id, endpoint)
                return _reused(found, idempotency_key, same)
        return self._create(who, body, idempotency_key is not None)

    def submit_batch(
        self,
        file: _Input,
        endpoint: str,
        *,
        completion_window: str = "24h",
        metadata: Optional[Dict[str, str]] = None,
        max_concurrency: Optional[int] = None,
        idempotency_key: Optional[str] = None,
        on_behalf_of: Optional[str] = None,
    ) -> Batch:
        """Check a JSONL input file, upload it and create its batch, each exactly once.

        See :func:`check_batch_file`, :meth:`upload_file` and :meth:`create_batch`. With an
        ``idempotency_key``, a batch of this user that already carries it is returned, and
        nothing is uploaded or sent, if it was made from the same bytes for the same endpoint;
        so the whole call is safe to run again at any point: the upload is found by its sha256,
        the batch by its key.

        :raises IdempotencyKeyError: the key names a batch made from other bytes or for another
            endpoint; nothing is uploaded.
        """
        key = idempotency_key
        return self._submit(file, endpoint, completion_window, metadata, max_concurrency, key, on_behalf_of)[0]

    def _submit(
        self,
        file: _Input,
        endpoint: str,
        completion_window: str,
        metadata: Optional[Dict[str, str]],
        max_concurrency: Optional[int],
        key: Optional[str],
        on_behalf_of: Optional[str],
    ) -> Tuple[Batch, Dict[str, int]]:
        """submit_batch, and the custom_ids of the file it checked (each with its line)."""
        who = self._user(on_behalf_of)
        _check_create(endpoint, completion_window, metadata, max_concurrency, key)  # before any read
        with _opened(file) as (stream, name):
            if not _seekable(stream):
                raise TypeError("file must be seekable to be uploaded: it is checked, then sent")
            start = stream.tell()
            ids, size, digest = _scan(stream, endpoint)
            stream.seek(start)
            if key is not None:
                found = self._find_batch(who, key)
                if found is not None:
                    same = found.endpoint == endpoint and self._holds(found.input_file_id, who, size, digest)
                    return _reused(found, key, same), ids
            uploaded = self._upload(stream, name, "batch", who, size, digest)
        body = _create_body(uploaded.id, endpoint, completion_window, metadata, max_concurrency, key)
        return self._create(who, body, key is not None), ids

    def resubmit_failed(
        self,
        batch: Union[Batch, str],
        *,
        metadata: Optional[Dict[str, str]] = None,
        on_kept: Optional[Callable[[BatchResult], None]] = None,
        on_behalf_of: Optional[str] = None,
    ) -> Optional[Batch]:
        """Send the requests of a finished batch that failed again, as a new batch; None if none failed.

        Failed: every line of its error file, every output line whose status may pass (408, 429,
        500, 502, 503, 504), and every ``custom_id`` of its input that came back in neither file.
        An output line with another status would fail the same way again: it is not resent, and
        ``on_kept`` sees it. The new input holds the failed lines of the original input file, byte
        for byte and in their order, streamed through a temporary file: memory grows with the
        number of requests (a set of ids), never with their size. It is then checked, uploaded and
        created as :meth:`submit_batch` does, with the batch's endpoint and ``metadata[RESUBMIT_KEY]``
        naming the batch it came from.

        Run again, it returns the batch the first run made (the newest that names this one in
        ``RESUBMIT_KEY``), reading and sending nothing, unless that one ended failed, expired or
        cancelled: then it makes a new one.

        :param batch: a terminal Batch, or its id (fetched first).
        :param metadata: up to 14 pairs of strings, kept on the new batch beside RESUBMIT_KEY and
            CREATE_KEY.
        :raises ValueError: also for a batch that has not finished.
        """
        _check_metadata(metadata, 14)
        who = self._user(on_behalf_of)
        batch = self._finished(batch, who)
        earlier = self._find_batch(who, batch.id, key=RESUBMIT_KEY, oldest=batch.created_at)
        if earlier is not None and earlier.status not in ("failed", "expired", "cancelled"):
            return earlier
        seen: Set[str] = set()
        failed: Set[str] = set()
        for kind, file_id in [("output", batch.output_file_id), ("error", batch.error_file_id)]:
            if file_id is None:
                continue
            for _, result in self._file_lines(file_id, who, None, BatchResult.from_dict, f"{kind} file", batch):
                seen.add(result.custom_id)
                code = (result.response and result.response.status_code) or 0  # 0: no response, or no status
                if file_id == batch.error_file_id or result.response is None or code in _TRANSIENT_STATUSES:
                    failed.add(result.custom_id)
                elif code >= 400 and on_kept is not None:
                    on_kept(result)
        import tempfile  # only here: a plain get_batch does not need it

        with tempfile.TemporaryFile() as new_input:
            for line, custom_id in self._file_lines(batch.input_file_id, who, None, _custom_id, "input file", batch):
                if custom_id in failed or custom_id not in seen:
                    new_input.write(line + b"\n")
            if not new_input.tell():
                return None
            new_input.seek(0)
            sent = dict(metadata or {}, **{RESUBMIT_KEY: batch.id})
            return self.submit_batch(new_input, batch.endpoint, metadata=sent, on_behalf_of=on_behalf_of)

    def list_batches(
        self,
        *,
        page_size: int = 20,
        after: Optional[str] = None,
        limit: Optional[int] = None,
        on_behalf_of: Optional[str] = None,
    ) -> Iterator[Batch]:
        """Yield this user's batches, newest first, one page request at a time as they are taken.

        :param page_size: batches a request, 1 to 100.
        :param after: start after the batch with this id.
        :param limit: at most this many, asking for no page more than they need.
        :raises InvalidResponseError: also for a cursor that does not advance, or an empty page
            that says there are more.
        """
        if type(page_size) is not int or not 1 <= page_size <= 100:
            raise ValueError(f"page_size must be an integer from 1 to 100, not {page_size!r}")
        if after is not None:
            _check_id(after, "after")
        if limit is not None and (type(limit) is not int or limit < 1):
            raise ValueError(f"limit must be None or a positive integer, not {limit!r}")
        if limit is not None:  # one more: a page's last items that share a second wait for the next page
            page_size = min(page_size, limit + 1)
        pairs = self._listing(Batch.from_dict, _BATCHES, self._user(on_behalf_of), page_size, after=after)
        return itertools.islice((batch for batch, _ in pairs), limit)

    def cancel_batch(self, batch_id: Union[Batch, str], *, on_behalf_of: Optional[str] = None) -> Batch:
        """Ask the gateway to cancel a batch (by its id, or a Batch); it answers with the batch, ``cancelling``.

        Cancelling twice is harmless, so this is retried as a read is. A 409 for a batch that is
        cancelling or cancelled (as a retry after a lost answer may get) returns that batch.

        :raises ConflictError: the batch has finished otherwise, and cannot be cancelled.
        """
        batch_id = _batch_id(batch_id, "batch_id")
        who = self._user(on_behalf_of)
        try:
            path = _BATCHES + "/" + quote(batch_id, safe="") + "/cancel"
            return self._batch(self._transport.request("POST", path, who), batch_id)
        except ConflictError:
            # Also what a retry gets once an earlier cancel, whose answer was lost, has taken.
            batch = self._get(batch_id, who)
            if batch.status in ("cancelling", "cancelled"):
                return batch
            raise

    def _user(self, on_behalf_of: Optional[str]) -> Optional[str]:
        return self.on_behalf_of if on_behalf_of is None else _check_on_behalf_of(on_behalf_of)

    def _get(self, batch_id: str, who: Optional[str], sleep: Optional[Callable[[float], None]] = None) -> Batch:
        path = _BATCHES + "/" + quote(batch_id, safe="")
        return self._batch(self._transport.request("GET", path, who, sleep=sleep), batch_id)

    def _finished(self, batch: Union[Batch, str], who: Optional[str]) -> Batch:
        """The terminal Batch a parameter means: the one given, or the one its id names, fetched."""
        batch = batch if isinstance(batch, Batch) else self._get(_batch_id(batch, "batch"), who)
        if not batch.is_terminal:
            ended = "completed, failed, expired or cancelled"
            raise ValueError(f"batch {batch.id} is {batch.status}: read its results once it is {ended}")
        try:
            for file_id in (batch.output_file_id, batch.error_file_id, batch.input_file_id):
                if file_id is not None:
                    _check_id(file_id, "file id")
        except ValueError as exc:  # the server's, or a Batch's made so: no path can hold it
            raise InvalidResponseError(f"batch {batch.id}: {exc}", request_id=batch.request_id) from exc
        return batch

    def _batch(self, reply: "_Reply", batch_id: str) -> Batch:
        """The Batch a reply holds: the one asked for, as a desync or a mixed-up cache could hand over another."""
        batch = Batch.from_dict(reply.data, reply.request_id)
        if batch.id != batch_id:
            message = f"response is for batch {batch.id!r}, not {batch_id!r}"
            raise InvalidResponseError(message, field="id", request_id=batch.request_id)
        return batch

    def _create(self, who: Optional[str], body: Dict[str, Any], keyed: bool) -> Batch:
        """POST a create; after a lost answer, the batch that carries its CREATE_KEY is looked for first."""
        mark = body["metadata"].get(CREATE_KEY)
        started = time.monotonic()

        def lookup() -> Optional[Batch]:
            return self._find_batch(who, mark, started=None if keyed else started)

        return self._transport.write(_BATCHES, who, body, Batch.from_dict, None if mark is None else lookup, "batch")

    def _upload(self, stream: BinaryIO, name: str, purpose: str, who: Optional[str], size: int, digest: str) -> File:
        """POST the rest of a stream as a file, unless this user has it already; see :meth:`upload_file`."""
        name = name if name.strip() and name != "blob" else "input.jsonl"
        found = self._find_file(who, purpose, digest, size)
        if found is not None:
            return found
        started = time.monotonic()

        def lookup() -> Optional[File]:
            return self._find_file(who, purpose, digest, size, (name, started))

        body = _Multipart(stream, size, name, purpose)
        return self._transport.write(_FILES, who, body, File.from_dict, lookup, "file")

    def _find_batch(
        self,
        who: Optional[str],
        value: str,
        *,
        key: str = CREATE_KEY,
        oldest: Optional[float] = None,
        started: Optional[float] = None,
    ) -> Optional[Batch]:
        """The newest batch of this user whose ``metadata[key]`` is ``value``, or None.

        Only among those made since ``oldest`` (a created_at), or with ``started`` (the
        ``time.monotonic()`` a call began) those the gateway made since then by its own clock: the
        first page's Date, less the time since. With neither, among all of the user's batches.
        """
        for batch, reply in self._listing(Batch.from_dict, _BATCHES, who, 100):
            if started is not None:
                oldest, started = _since(reply, started), None
            if oldest is not None and batch.created_at < oldest:
                return None  # newest first: older ones cannot be it
            if (batch.metadata or {}).get(key) == value:
                return batch
        return None

    def _find_file(
        self, who: Optional[str], purpose: str, digest: str, size: int, sent: Optional[Tuple[str, float]] = None
    ) -> Optional["File"]:
        """A usable file with these bytes; with ``sent`` (its name and the monotonic time its upload began),
        also one with no sha256 that the gateway made since then, by its clock.

        Usable: not failed, and not expiring within _FILE_MARGIN of the gateway's Date. Without a
        Date, a file that may expire is not reused, and a file with no sha256 is not taken for the
        one sent.
        """
        now = oldest = None
        # The sha256 filter narrows the list; what comes back is checked, not trusted.
        query = {"purpose": purpose, "sha256": digest}
        for index, (found, reply) in enumerate(self._listing(File.from_dict, _FILES, who, 100, query)):
            if index == 0:
                now = _http_date(reply.date)
                oldest = _since(reply, sent[1]) if sent else None
            if (found.bytes, found.purpose) != (size, purpose) or found.status == "error":
                continue
            if found.expires_at is not None and (now is None or found.expires_at < now + _FILE_MARGIN):
                continue  # about to go: a batch made from it could be refused
            if found.sha256 == digest:
                return found
            if sent and (found.sha256, found.filename) == (None, sent[0]) and oldest and found.created_at >= oldest:
                return found
        return None

    def _holds(self, file_id: str, who: Optional[str], size: int, digest: str) -> bool:
        """Whether a file of this user holds exactly these bytes: by its sha256, else by reading it."""
        path = _FILES + "/" + _check_id(file_id, "input_file_id")
        stored = File.from_dict(*self._transport.request("GET", path, who)[:2])
        if stored.bytes != size or stored.sha256 is not None:
            return (stored.bytes, stored.sha256) == (size, digest)
        return self._transport.digest(path + "/content", who) == (size, digest)

    def _listing(
        self,
        parse: Callable[[Any, Optional[str]], "_Listed"],
        path: str,
        who: Optional[str],
        limit: int,
        query: Optional[Dict[str, str]] = None,
        after: Optional[str] = None,
    ) -> Iterator[Tuple["_Listed", "_Reply"]]:
        """The items of a list endpoint, newest first, each once and beside the reply of its page: a listing
        that is whole, or an InvalidResponseError.

        A page is checked before any of its items is yielded: one already yielded, one newer than
        the one before it, or ``has_more`` with nothing new, is an error. Servers sort by
        ``created_at`` in whole seconds, and some break ties in a new order on every request, or
        list only what is older than the cursor: so a page's last items that share a second are
        held back, and the next page is asked for after the item before them, from which every
        order of the tie follows. When a whole page shares one second, it is asked for again with
        100 items; a tie longer than a page cannot be listed by pages, and is an error.
        """
        yielded: Set[str] = set()
        newest: Optional[int] = None  # the created_at of the last item yielded: none after it is newer
        size = limit
        while True:
            reply = self._transport.request("GET", path, who, query=dict(query or {}, limit=size, after=after))
            page = _checked_page(reply.data, reply.request_id)
            items = [parse(item, reply.request_id) for item in page["data"]]
            fresh: List[_Listed] = []
            here: Set[str] = set()
            for item in items:
                if item.id in yielded and item.created_at == newest and item.id != after:
                    continue  # the cursor's tie, in another order than before: listed already
                later = fresh[-1].created_at if fresh else newest
                if item.id in yielded or item.id in here:
                    raise _listing_error(f"page repeats {item.id!r}, listed already", reply)
                if later is not None and item.created_at > later:
                    raise _listing_error(f"page is not newest first: {item.id!r} after created_at {later}", reply)
                fresh.append(item)
                here.add(item.id)
            if not page["has_more"]:
                yield from ((item, reply) for item in fresh)
                return
            ready = [item for item in fresh if item.created_at != fresh[-1].created_at]
            if not ready:
                if not items:
                    problem = "page is empty but has_more is true"
                elif size < 100:
                    size = 100  # room past the tie
                    continue
                elif fresh:
                    tie = f"all {len(fresh)} new items of a page share created_at {fresh[-1].created_at}"
                    problem = tie + ", and more follow: pages past a tie could skip or repeat some"
                else:
                    problem = f"cursor {after!r} did not advance"
                raise _listing_error(problem, reply)
            yield from ((item, reply) for item in ready)
            yielded.update(item.id for item in ready)
            after, newest, size = ready[-1].id, ready[-1].created_at, limit

    def _file_lines(
        self,
        file_id: str,
        who: Optional[str],
        progress: Optional[Callable[[str, int, int, Optional[int]], None]],
        parse: Callable[[Any], _T],
        role: str,
        batch: Optional[Batch],
    ) -> Iterator[Tuple[bytes, _T]]:
        """Each line of a file but blank ones (without its CRLF or LF), and what ``parse`` makes of its JSON.

        Its errors name it, as the ``role`` it has for ``batch``: "input file file-abc of batch batch_x".
        """
        name = f"{role} {file_id}" + ("" if batch is None else f" of batch {batch.id}")
        path = _FILES + "/" + quote(file_id, safe="") + "/content"
        shown = None if progress is None else functools.partial(progress, file_id)
        lines, taken = self._transport.lines(path, who, name, shown)
        try:
            for number, line in enumerate(lines, 1):
                if not line or line.isspace():
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                try:
                    yield line, parse(json.loads(line))
                except (ValueError, RecursionError) as exc:  # InvalidResponseError is a ValueError too
                    field = getattr(exc, "field", None)
                    what = str(exc) if field else f"not a JSON object: {_excerpt(line)!r}"
                    message = f"{name} line {number}: {what}"
                    raise InvalidResponseError(message, field=field, request_id=taken.request_id) from exc
        except APIStatusError as exc:
            exc.args = (f"{name}: {exc}",)  # which file, and why it was read: "404 File not found" says neither
            raise


class _Reply(NamedTuple):
    """A 2xx answer: its decoded JSON, X-Request-ID and Date (the gateway's clock, as it wrote it)."""

    data: Any
    request_id: Optional[str]
    date: Optional[str]


class _Transport:
    """The one road of every request, as requests' HTTPAdapter is to its Session.

    It sends through ``Session.send``, reads bodies within their caps and deadlines, maps failures
    to errors by type, keeps the key out of everything it hands back, and holds the one retry loop
    (_exchanges) for reads, writes and file streams.
    """

    def __init__(
        self, token: str, base_url: str, timeout: Tuple[float, float], max_retries: int, session: requests.Session
    ):
        self._token = token
        # The key as it may come back: in a body, in a JSON string, or in a line of a file.
        self._secrets = [token.encode(), json.dumps(token)[1:-1].encode()]
        self.base_url = base_url
        self._origin = _origin(base_url)
        self.timeout = timeout
        self._deadline = sum(timeout)
        self.max_retries = max_retries
        self.session = session

    def request(
        self,
        method: str,
        path: str,
        who: Optional[str],
        *,
        query: Optional[Dict[str, Any]] = None,
        sleep: Optional[Callable[[float], None]] = None,
    ) -> _Reply:
        """A read, or a write that can be sent again harmlessly (a cancel): the JSON of its 2xx answer."""

        def read(resp: requests.Response, length: Optional[int], deadline: float) -> Tuple[_Reply]:
            return (self._json(resp, length, deadline),)

        with contextlib.closing(self._exchanges(method, path, who, read, query=query, sleep=sleep)) as replies:
            return next(replies)

    def write(
        self,
        path: str,
        who: Optional[str],
        body: Any,
        parse: Callable[[Any, Optional[str]], _T],
        lookup: Optional[Callable[[], Optional[_T]]],
        what: str,
    ) -> _T:
        """POST a write that must happen once: what ``parse`` makes of its answer, or what ``lookup`` finds.

        It is sent again only where the gateway cannot have acted on it (not sent, 408, 429). After
        a failure that leaves that unknown (a broken connection or a timeout after it was sent,
        500, 502, 503, 504), it waits as before a retry (so that what a slow gateway made shows),
        then returns what ``lookup`` finds, or sends again if there is a retry left. Without a
        ``lookup``, such a failure is raised. A 2xx answer that cannot be read is an
        InvalidResponseError that says the gateway made the ``what`` (and its id, if the answer
        names one): sending it again would make another.
        """

        def read(resp: requests.Response, length: Optional[int], deadline: float) -> Tuple[_T]:
            reply = None
            try:
                reply = self._json(resp, length, deadline)
                return (parse(reply.data, reply.request_id),)
            except InvalidResponseError as exc:
                named = getattr(reply, "data", None)
                named = named.get("id") if type(named) is dict else None
                made = what + (f" {_excerpt(repr(named))}" if type(named) is str else "")
                exc.args = (f"the gateway made the {made}, but its answer cannot be read: {exc}",)
                raise

        with contextlib.closing(self._exchanges("POST", path, who, read, body=body, write=True, look=lookup)) as made:
            return next(made)

    def lines(
        self, path: str, who: Optional[str], name: str, progress: Optional[Callable[[int, int, Optional[int]], None]]
    ) -> Tuple[Iterator[bytes], "_Taken"]:
        """A file's lines, without their LF, streamed, and how far they have gone.

        After a break the file is asked for again, and read on from the line it broke in: the
        lines already taken are checked against what came before, and skipped. ``name`` (such
        as "file file-abc") starts their errors.
        """
        taken = _Taken()
        read = functools.partial(self._lines, taken=taken, name=name, progress=progress)
        return self._exchanges("GET", path, who, read, accept="*/*", follow=True), taken

    def digest(self, path: str, who: Optional[str]) -> Tuple[int, str]:
        """The size and sha256 of a file's content; after a break, read again from the start."""

        def read(resp: requests.Response, length: Optional[int], deadline: float) -> Tuple[Tuple[int, str]]:
            digest = hashlib.sha256()
            size = 0
            for chunk in self._chunks(resp, length):
                digest.update(chunk)
                size += len(chunk)
                self._in_time(deadline, resp, f"body not read within {self._deadline}s")
                deadline = time.monotonic() + self._deadline  # per chunk: a large file takes its time
            return ((size, digest.hexdigest()),)

        with contextlib.closing(self._exchanges("GET", path, who, read, accept="*/*", follow=True)) as digests:
            return next(digests)

    def _exchanges(
        self,
        method: str,
        path: str,
        who: Optional[str],
        read: Callable[[requests.Response, Optional[int], float], Iterable[_T]],
        *,
        accept: str = "application/json",
        query: Optional[Dict[str, Any]] = None,
        body: Any = None,
        follow: bool = False,
        sleep: Optional[Callable[[float], None]] = None,
        write: bool = False,
        look: Optional[Callable[[], Optional[_T]]] = None,
    ) -> Generator[_T, None, None]:
        """What ``read`` makes of a 2xx answer, sending again after a failure as _next_step says: the one retry loop.

        A write that the gateway may have acted on is not sent again blindly: ``look`` finds what
        it made, which ends the loop, or None. Without ``look``, such a failure is raised.
        """
        attempt = 1
        while True:
            deadline = time.monotonic() + self._deadline
            try:
                resp, length = self._response(method, path, who, accept, query, body, follow, attempt)
                with resp:
                    yield from read(resp, length, deadline)
                return
            except _Failure as failure:
                step = _next_step(failure, write)
                delay = None if step == "raise" or attempt > self.max_retries else _delay(failure, attempt)
                if step == "look":
                    if look is None:
                        raise failure.error from failure.error.__cause__
                    if delay is not None:
                        self._wait(method, path, failure, attempt, delay, sleep)
                    try:
                        found = look()
                    except MKA1Error as exc:  # the write's own error says what is unknown, and why
                        failure.error.args = (
                            f"{failure.error}; whether it was made is unknown, as looking failed: {exc}",
                        )
                        raise failure.error from exc
                    if found is not None:
                        yield found
                        return  # pragma: no cover - a write's caller takes one answer, and closes the loop
                if delay is None:
                    raise failure.error from failure.error.__cause__
                if step == "retry":
                    self._wait(method, path, failure, attempt, delay, sleep)
            attempt += 1

    def _wait(
        self,
        method: str,
        path: str,
        failure: "_Failure",
        attempt: int,
        delay: float,
        sleep: Optional[Callable[[float], None]],
    ) -> None:
        _log.debug(
            "%s %s: retry %d of %d in %.2fs after: %s", method, path, attempt, self.max_retries, delay, failure.error
        )
        (sleep or _sleep)(delay)

    def _response(
        self,
        method: str,
        path: str,
        who: Optional[str],
        accept: str,
        query: Optional[Dict[str, Any]],
        body: Any,
        follow: bool,
        attempt: int,
    ) -> Tuple[requests.Response, Optional[int]]:
        """One attempt: the response once its status is 2xx, its body unread, and its Content-Length; else
        raise a _Failure."""
        url = self.base_url + path
        ours = True  # the gateway's own origin, until a redirect says otherwise
        for hop in range(_MAX_REDIRECTS + 1):
            resp = self._send(method, url, accept, who if ours else None, ours, query, body)
            request_id = resp.headers.get("X-Request-ID")
            # The path only: a storage URL's query may hold a signature.
            _log.debug("%s %s -> %d (attempt %d, request %s)", method, path, resp.status_code, attempt, request_id)
            framing = length = None
            try:
                length = _content_length(resp.headers)
            except ValueError as exc:
                framing = str(exc)
            if framing is not None or resp.status_code < 200:
                # http.client took an interim 1xx for the final response; the real one is still on
                # the wire. Either way, this connection is never read again nor pooled.
                resp.close()
                cause = framing or f"interim response {resp.status_code} taken as final"
                raise self._connection_failure(None, method, url, cause)
            if resp.status_code < 300:
                return resp, length
            with resp:
                if not (follow and resp.is_redirect) or hop == _MAX_REDIRECTS:
                    raise _Failure(self._status_error(resp, length, request_id), "sent")
                target, refused = _redirect_target(url, resp.headers["Location"])
                if refused:
                    raise _Failure(self._status_error(resp, length, request_id, refused), "sent")
                self._read_error_body(resp, length)  # so that its connection is reused
                url, path = target, urlsplit(target).path
                ours = _origin(url) == self._origin
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _send(
        self,
        method: str,
        url: str,
        accept: str,
        who: Optional[str],
        ours: bool,
        query: Optional[Dict[str, Any]],
        body: Any,
    ) -> requests.Response:
        # The key and the end user's id go to the gateway only, never to storage it redirects to.
        headers = {
            "Accept": accept,
            # Bodies are decoded here, with the caps applied to the decoded size.
            "Accept-Encoding": "identity",
            "User-Agent": _USER_AGENT,
            # None also removes an X-On-Behalf-Of default that the caller's session may carry.
            "X-On-Behalf-Of": who,
        }
        data: Any = None
        proxies: Dict[str, str] = {}
        if isinstance(body, _Multipart):
            data, headers["Content-Type"] = body, body.content_type
        elif body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        # The session's response hooks run too: a request's own hooks would replace them.
        hooks = self.session.hooks.get("response") or []
        hooks = [hooks] if callable(hooks) else list(hooks)
        auth = _BearerAuth(self._token if ours else None)
        request = requests.Request(
            method, url, headers, data=data, params=query, auth=auth, hooks={"response": [*hooks, _stop_at_redirect]}
        )
        try:
            prepared = self.session.prepare_request(request)
            env = self.session.merge_environment_settings(url, {}, True, None, None)
            proxies = dict(env["proxies"])
            return self.session.send(
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
        except MKA1Error:
            raise  # a file that changed while it was uploaded
        except Exception as exc:  # requests, urllib3, or whatever a mounted adapter raises
            raise self._connection_failure(exc, method, url, proxies=proxies) from exc

    def _json(self, resp: requests.Response, length: Optional[int], deadline: float) -> _Reply:
        """A JSON answer, its body read whole within the cap and the deadline."""
        request_id = resp.headers.get("X-Request-ID")
        if length is not None and length > MAX_BODY_BYTES:
            raise InvalidResponseError(_too_big(str(length)), request_id=request_id)
        body = self._read(resp, length, MAX_BODY_BYTES, deadline)
        if len(body) > MAX_BODY_BYTES:
            raise InvalidResponseError(_too_big("more than " + str(MAX_BODY_BYTES)), request_id=request_id)
        try:
            data = json.loads(self._clean(body))  # bytes: UTF-8, 16 or 32, with or without a byte order mark
        except (ValueError, RecursionError) as exc:
            message = f"response is not JSON: {_excerpt(self._clean(body))!r}"  # a proxy may echo the request
            raise InvalidResponseError(message, request_id=request_id) from exc
        return _Reply(data, request_id, resp.headers.get("Date"))

    def _read(self, resp: requests.Response, length: Optional[int], limit: int, deadline: float) -> bytes:
        """The decoded body, or its first ``limit`` + 1 bytes, read within the deadline."""
        chunks = []
        size = 0
        for chunk in self._chunks(resp, length):
            chunks.append(chunk)
            size += len(chunk)
            self._in_time(deadline, resp, f"body not read within {self._deadline}s")
            if size > limit:
                break
        return b"".join(chunks)

    def _read_error_body(self, resp: requests.Response, length: Optional[int]) -> bytes:
        """An error's body, the key replaced, then cut at _ERROR_BODY_BYTES (so that no part of a key echoed
        across the cut is kept); read whole when small, so that the connection is reused."""
        with contextlib.suppress(_Failure, InvalidResponseError):  # a body that breaks off adds nothing
            deadline = time.monotonic() + self._deadline
            body = self._read(resp, length, _ERROR_BODY_BYTES + len(self._secrets[-1]), deadline)
            return self._clean(body)[:_ERROR_BODY_BYTES]
        return b""

    def _chunks(self, resp: requests.Response, length: Optional[int]) -> Iterator[bytes]:
        """The body as it arrives, decoded; the connection goes back to the pool only once all is read."""
        read = _read1(resp.raw)
        decoder = None
        received = 0
        while True:
            try:
                data = read(_CHUNK)
            except Exception as exc:  # socket, http.client, urllib3, or a stand-in raw's own
                cut = f"connection closed after {received} of {length} bytes" if length is not None else None
                raise self._connection_failure(exc, _method(resp), resp.url, cut if _incomplete(exc) else None) from exc
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
            raise self._connection_failure(
                None, _method(resp), resp.url, f"connection closed after {received} of {length} bytes"
            )
        release = getattr(resp.raw, "release_conn", None)
        if release is not None:
            release()

    def _lines(
        self,
        resp: requests.Response,
        length: Optional[int],
        deadline: float,
        taken: "_Taken",
        name: str,
        progress: Optional[Callable[[int, int, Optional[int]], None]],
    ) -> Iterator[bytes]:
        """This attempt's lines of a file, from the first not yet taken."""
        request_id = taken.request_id = resp.headers.get("X-Request-ID")
        # Progress counts decoded bytes, so the length of an encoded body is no total for it.
        total = length if _encoding(resp) == "identity" else None
        number = 0
        skipped = 0
        for line in self._split(resp, length, taken, name):
            number += 1
            if number <= taken.lines:  # read before the connection broke: check, and skip
                skipped += len(line) + 1
                if number == taken.lines and (skipped, line) != (taken.bytes, taken.last):
                    raise _changed(name, request_id)
                continue
            taken.lines = number
            taken.bytes += len(line) + 1
            taken.last = line
            if progress is not None:
                progress(number, taken.read, total)
            yield line
        if number < taken.lines:
            raise _changed(name, request_id)

    def _split(self, resp: requests.Response, length: Optional[int], taken: "_Taken", name: str) -> Iterator[bytes]:
        """The body's lines, each within the deadline and the size cap, the key replaced; counts ``taken.read``."""
        deadline = time.monotonic() + self._deadline
        parts: List[bytes] = []
        size = 0
        taken.read = 0
        for chunk in self._chunks(resp, length):
            taken.read += len(chunk)
            *lines, tail = self._clean(chunk).split(b"\n")
            for line in lines:
                if parts:  # a line that spans chunks, and so may a key
                    line = self._clean(b"".join([*parts, line]))
                    parts, size = [], 0
                if len(line) > MAX_LINE_BYTES:
                    raise _too_long(name, taken.lines + 1, resp)
                yield line
            if lines:  # the deadline starts again after the caller took the last line: its time is not the server's
                deadline = time.monotonic() + self._deadline
            if tail:
                parts.append(tail)
                size += len(tail)
                if size > MAX_LINE_BYTES:
                    raise _too_long(name, taken.lines + 1, resp)
            self._in_time(deadline, resp, f"line {taken.lines + 1} not read within {self._deadline}s")
        if parts:
            yield self._clean(b"".join(parts))

    def _in_time(self, deadline: float, resp: requests.Response, what: str) -> None:
        if time.monotonic() > deadline:
            raise self._connection_failure(socket.timeout(what), _method(resp), resp.url, what)

    def _status_error(
        self, resp: requests.Response, length: Optional[int], request_id: Optional[str], refused: str = "not followed"
    ) -> APIStatusError:
        text = self._read_error_body(resp, length).decode("utf-8", "replace")
        try:
            # Parsed, each string has the key replaced again: JSON may spell it with escapes (\/, \u006d).
            data: Any = self._scrub(json.loads(text)) if text else None
        except (ValueError, RecursionError):
            data = text
        status = resp.status_code
        message = _status_message(status, data, text, resp.reason, resp.headers.get("Location"), refused)
        return _status_class(status)(
            self._redact(message) + (f" (request {request_id})" if request_id else ""),
            status_code=status,
            request_id=request_id,
            body=data,
            retry_after=_retry_after(resp.headers.get("Retry-After"), resp.headers.get("Date")),
        )

    def _connection_failure(
        self,
        exc: Optional[BaseException],
        method: str,
        url: str,
        cause: Optional[str] = None,
        proxies: Optional[Dict[str, str]] = None,
    ) -> "_Failure":
        """A failed send or body read as the error to raise, and what a retry needs to know of it."""
        chain = _chain(exc)
        status = _status_in_message(chain, "retry")
        if status is not None:
            # The session's own urllib3 Retry gave up on this status: report it as that status.
            given_up = _status_class(status)(f"{status} after the session adapter's own retries", status_code=status)
            return _Failure(given_up, "final")
        final = False
        if cause is None:
            cause, final = _root_cause(chain, requests.utils.select_proxy(url, proxies or {}))
        timed_out = any(isinstance(e, _TIMEOUTS) for e in chain)
        message = f"{method} {urlsplit(url).path} on {_host(url)} {'timed out' if timed_out else 'failed'}: {cause}"
        error = (APITimeoutError if timed_out else APIConnectionError)(self._redact(message))
        for e in chain:  # requests' errors keep the request, whose Authorization is the key
            if isinstance(e, requests.RequestException):
                e.request = e.response = None
        error.__cause__ = exc
        unsent = any(isinstance(e, _UNSENT) for e in chain)
        return _Failure(error, "final" if final else "unsent" if unsent else "sent")

    def _clean(self, data: bytes) -> bytes:
        """Bytes from the server with the key, should they echo it, replaced."""
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, b"[token]")
        return data

    def _redact(self, text: str) -> str:
        """A message with the key, should what it quotes echo it, replaced."""
        for secret in self._secrets:
            text = text.replace(secret.decode(), "[token]")  # the key is printable ASCII
        return text

    def _scrub(self, data: Any) -> Any:
        """Parsed JSON with the key replaced in every string."""
        if isinstance(data, str):
            return self._redact(data)
        if isinstance(data, list):
            return [self._scrub(item) for item in data]
        if isinstance(data, dict):
            return {self._redact(key): self._scrub(value) for key, value in data.items()}
        return data


class _Failure(Exception):
    """A failed attempt: the error to raise, and beside it its kind for the retry policy.

    ``final``: a retry cannot change it; ``unsent``: the request never reached the server;
    ``sent``: it may have (a status, a broken connection or a timeout after sending).
    """

    def __init__(self, error: MKA1Error, kind: str):
        super().__init__(error)
        self.error = error
        self.kind = kind

    @property
    def ambiguous(self) -> bool:
        """Whether the server may have acted on the request: a write must look before it sends again."""
        if self.kind != "sent":
            return False
        return not isinstance(self.error, APIStatusError) or self.error.status_code in _AMBIGUOUS_STATUSES


def _next_step(failure: _Failure, write: bool) -> str:
    """The retry policy: "retry", "raise", or for a write the server may have acted on, "look" first.

    A read may be sent again after any failure that can pass: a connection error, a timeout, a
    transient status. A write only where the server cannot have acted on it (not sent, 408, 429).
    """
    if failure.kind == "final":
        return "raise"
    error = failure.error
    if isinstance(error, APIStatusError) and error.status_code not in _TRANSIENT_STATUSES:
        return "raise"
    return "look" if write and failure.ambiguous else "retry"


def _delay(failure: _Failure, attempt: int) -> Optional[float]:
    """Seconds to wait before attempt ``attempt + 1``: Retry-After, else backoff; None past MAX_RETRY_AFTER."""
    retry_after = getattr(failure.error, "retry_after", None)
    if retry_after is not None:
        return retry_after if retry_after <= MAX_RETRY_AFTER else None
    # Exponential backoff with full jitter, so that many clients do not retry in step.
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))  # noqa: S311 - not a secret


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


class _Multipart:
    """A multipart/form-data body streamed from a file, its length known up front (no chunked encoding)."""

    def __init__(self, stream: BinaryIO, size: int, filename: str, purpose: str):
        import uuid

        boundary = uuid.uuid4().hex
        self.content_type = "multipart/form-data; boundary=" + boundary
        # WHATWG's escaping of a form's file name: quotes and line breaks percent-encoded.
        name = filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
        self._head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {'application/jsonl' if purpose == 'batch' else 'application/octet-stream'}\r\n\r\n"
        ).encode()
        self._tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        self._stream = stream
        self._start = stream.tell()
        self._size = size

    def __len__(self) -> int:
        return len(self._head) + self._size + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        self._stream.seek(self._start)  # again on every attempt
        left = self._size
        while left:
            chunk = self._stream.read(min(_UPLOAD_CHUNK, left))
            if not chunk:
                raise InvalidBatchFileError("the file got shorter while it was uploaded", line=None)
            left -= len(chunk)
            yield chunk
        yield self._tail


class _Taken:
    """How far a file's read has gone, across its attempts: the lines taken, their bytes, the last one; and
    this attempt's bytes read and request id."""

    def __init__(self) -> None:
        self.request_id: Optional[str] = None
        self.lines = 0
        self.bytes = 0
        self.last = b""
        self.read = 0


def _changed(name: str, request_id: Optional[str]) -> InvalidResponseError:
    return InvalidResponseError(
        f"{name} changed while it was read again after a broken connection", request_id=request_id
    )


def _too_long(name: str, number: int, resp: requests.Response) -> InvalidResponseError:
    message = f"{name} line {number}: longer than the {MAX_LINE_BYTES}-byte limit"
    return InvalidResponseError(message, request_id=resp.headers.get("X-Request-ID"))


def _close_pools(session: requests.Session) -> None:
    """Close the idle connections of a Session's urllib3 pools, as Session.close does with urllib3 1.x."""
    # urllib3 2's PoolManager.clear() forgets its pools without closing them, leaving their sockets to
    # the garbage collector; an error the caller keeps (its traceback, a response, its pool) holds it off.
    for adapter in session.adapters.values():
        managers = [getattr(adapter, "poolmanager", None), *getattr(adapter, "proxy_manager", {}).values()]
        for pools in [getattr(manager, "pools", None) for manager in managers]:
            for key in pools.keys() if pools is not None else ():
                pools[key].close()  # type: ignore[index]


def _owned(client: Client, make: Callable[[Client], Iterator[_T]]) -> Iterator[_T]:
    """What ``make(client)`` yields, then the client closed: a module function's iterator owns its Client.

    ``make`` runs now, so that a bad argument or a batch not found is raised at the call; then the
    Client is closed at once. It is closed once, at the end of the iteration, or when the iterator
    is dropped, read or not (a generator never started runs no ``finally``).
    """
    import weakref

    try:
        items = make(client)
    except BaseException:
        client.close()
        raise

    def closing() -> Iterator[_T]:
        try:
            yield from items
        finally:
            close()

    iterator = closing()
    close = weakref.finalize(iterator, client.close)
    return iterator


def _batch_id(batch: object, name: str) -> str:
    """The id a batch parameter means: a Batch's own, or a batch id; a file id here is an error."""
    if isinstance(batch, Batch):
        batch = batch.id
    elif not isinstance(batch, str):
        raise TypeError(f"{name} must be a Batch or a batch id, not {type(batch).__name__}")
    _check_id(batch, name)
    if batch.startswith(("file-", "file_")):
        raise ValueError(f"{name} {batch!r} is a file id, not a batch's: read a file by its id with iter_file")
    return batch


def _check_create(
    endpoint: str,
    completion_window: str,
    metadata: Optional[Dict[str, str]],
    max_concurrency: Optional[int],
    key: Optional[str],
) -> None:
    _check_endpoint(endpoint)
    if not isinstance(completion_window, str) or not completion_window:
        raise ValueError(f"completion_window must be a string such as '24h', not {completion_window!r}")
    _check_metadata(metadata, 16 if key is None else 15)
    if max_concurrency is not None and (type(max_concurrency) is not int or max_concurrency < 1):
        raise ValueError(f"max_concurrency must be None or a positive integer, not {max_concurrency!r}")
    if key is not None:
        _check_key(key)


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"idempotency_key must be a string, not {type(key).__name__}")
    if len(key) > 64 or not _printable_ascii(key):
        raise ValueError(f"idempotency_key must be 1 to 64 printable ASCII characters, not {_excerpt(repr(key))}")
    return key


def _check_metadata(metadata: Optional[Dict[str, str]], room: int) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or any(type(k) is not str or type(v) is not str for k, v in metadata.items()):
        raise TypeError("metadata must be a dict of strings to strings")
    if len(metadata) > room:
        raise ValueError(f"metadata holds at most {room} pairs here, not {len(metadata)}")
    if CREATE_KEY in metadata:  # its value must be new to each call
        raise ValueError(f"metadata key {CREATE_KEY!r} is this module's own")


def _create_body(
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: Optional[Dict[str, str]],
    max_concurrency: Optional[int],
    key: Optional[str],
) -> Dict[str, Any]:
    """create_batch's JSON, its arguments checked; the metadata gains CREATE_KEY (the key, or a new
    value) where there is room."""
    _check_create(endpoint, completion_window, metadata, max_concurrency, key)
    sent = dict(metadata or {})
    if key is not None:
        sent[CREATE_KEY] = key
    elif len(sent) < 16:
        import uuid  # only here: a plain get_batch does not need it

        sent[CREATE_KEY] = uuid.uuid4().hex
    body: Dict[str, Any] = {"input_file_id": input_file_id, "endpoint": endpoint}
    body.update(completion_window=completion_window, metadata=sent)
    if max_concurrency is not None:
        body["max_concurrency"] = max_concurrency
    return body


def _check_endpoint(endpoint: object) -> str:
    if not isinstance(endpoint, str) or not endpoint.startswith("/") or not endpoint.isprintable():
        raise ValueError(f"endpoint must be a path such as '/v1/chat/completions', not {endpoint!r}")
    if endpoint not in ENDPOINTS:  # read at each call, so that a caller may add a newer one
        known = ", ".join(ENDPOINTS)
        raise ValueError(
            f"endpoint {endpoint!r} is none the gateway documents ({known}); a newer one: add it to ENDPOINTS"
        )
    return endpoint


def _check_line(line: bytes, endpoint: str, number: int, first: Dict[str, int]) -> str:
    """The custom_id of one line of an input file, once the line is checked."""
    try:
        data = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidBatchFileError(f"not UTF-8 (byte {exc.start + 1})", line=number) from None
    except (ValueError, RecursionError):
        raise InvalidBatchFileError(f"not JSON: {_excerpt(line)!r}", line=number) from None
    if type(data) is not dict:
        raise InvalidBatchFileError(f"not a JSON object: {_excerpt(line)!r}", line=number)
    custom_id = data.get("custom_id")
    if type(custom_id) is not str:
        raise InvalidBatchFileError(_bad_field("custom_id", "a string", data), line=number)
    if custom_id in first:
        message = f"custom_id {_excerpt(repr(custom_id))} is a duplicate: it is on line {first[custom_id]} too"
        raise InvalidBatchFileError(message, line=number)
    if data.get("method") != "POST":
        raise InvalidBatchFileError(_bad_field("method", '"POST"', data), line=number)
    if data.get("url") != endpoint:
        raise InvalidBatchFileError(_bad_field("url", f"the batch's endpoint {endpoint!r}", data), line=number)
    if type(data.get("body")) is not dict:
        raise InvalidBatchFileError(_bad_field("body", "an object", data), line=number)
    return custom_id


def _bad_field(key: str, expected: str, data: Dict[str, Any]) -> str:
    if key not in data:
        return f"{key} is missing"
    got = data[key]
    return f"{key} must be {expected}, not {_excerpt(repr(got)) if isinstance(got, (str, int)) else type(got).__name__}"


@contextlib.contextmanager
def _opened(file: _Input) -> Iterator[Tuple[BinaryIO, str]]:
    """A binary stream of a path or a file object, and its base name; a file object is put back where it stood."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as stream:
            yield stream, os.path.basename(os.fspath(file))
        return
    if not callable(getattr(file, "read", None)) or not isinstance(file.read(0), bytes):
        raise TypeError(f"file must be a path or a binary file object open for reading, not {type(file).__name__}")
    seekable = _seekable(file)
    start = file.tell() if seekable else 0
    try:
        name = getattr(file, "name", "")  # a TemporaryFile's is its descriptor
        yield file, os.path.basename(name) if isinstance(name, str) else ""
    finally:
        if seekable:
            file.seek(start)


def _scan(stream: BinaryIO, endpoint: str) -> Tuple[Dict[str, int], int, str]:
    """Every line of a batch input file checked, read once from where it stands: its custom_ids (each
    with the line it is on), and its size and sha256."""
    first: Dict[str, int] = {}
    digest = hashlib.sha256()
    size = 0
    for number, line in enumerate(stream, 1):
        digest.update(line)
        size += len(line)
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            raise InvalidBatchFileError("starts with a UTF-8 byte order mark; save it without one", line=1)
        if line.strip():
            first[_check_line(line, endpoint, number, first)] = number
    if not first:
        raise InvalidBatchFileError("the file has no requests", line=None)
    return first, size, digest.hexdigest()


def _seekable(stream: BinaryIO) -> bool:
    return bool(getattr(stream, "seekable", lambda: False)())


def _digest(stream: BinaryIO) -> Tuple[int, str]:
    """The size and sha256 of what is left of a stream, which is then put back."""
    if not _seekable(stream):
        raise TypeError("file must be seekable to be uploaded: it is read once to find its sha256, then sent")
    start = stream.tell()
    digest = hashlib.sha256()
    size = 0
    for chunk in iter(functools.partial(stream.read, _UPLOAD_CHUNK), b""):
        digest.update(chunk)
        size += len(chunk)
    stream.seek(start)
    return size, digest.hexdigest()


def _checked_page(data: Any, request_id: Optional[str]) -> Dict[str, Any]:
    """One page of a list endpoint, its shape checked; the caller parses the items."""
    if type(data) is not dict:
        error = _invalid("list", "an object", data)
    elif type(data.get("data")) is not list:
        error = _invalid("data", "a list", data.get("data"))
    elif type(data.get("has_more")) is not bool:
        error = _invalid("has_more", "true or false", data.get("has_more"))
    else:
        return data
    error.request_id = request_id
    raise error


def _listing_error(problem: str, reply: _Reply) -> InvalidResponseError:
    return InvalidResponseError(problem, field="data", request_id=reply.request_id)


def _custom_id(data: Any) -> str:
    """The custom_id of a line of an input file read back from the gateway."""
    custom_id = data.get("custom_id") if type(data) is dict else None
    if type(custom_id) is not str:
        raise InvalidResponseError("expected a JSON object with a string custom_id", field="custom_id")
    return custom_id


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


def _root_cause(chain: List[BaseException], proxy: Optional[str]) -> Tuple[str, bool]:
    """The root cause of a connection failure in a few words, and whether a retry cannot change it."""
    for e in chain:
        if isinstance(e, ssl.SSLError) and e.reason == "CERTIFICATE_VERIFY_FAILED":
            detail = getattr(e, "verify_message", None)  # Python 3.7 and later
            return "certificate verify failed" + (": " + detail if detail else ""), True
    tunnel = _status_in_message(chain, "tunnel")
    if tunnel is not None:
        return f"proxy refused CONNECT: {tunnel}", 400 <= tunnel < 500
    text = next((text for kind, text in _CAUSES if any(isinstance(e, kind) for e in chain)), None)
    if text is None:
        last = chain[-1] if chain else None
        text = _excerpt(str(last) or type(last).__name__)
    if proxy is None:
        return text, False
    host = _host(proxy if "://" in proxy else "http://" + proxy)
    if not any(isinstance(e, _PROXY_ERRORS) for e in chain):
        # urllib3 2 words a CONNECT that timed out as any read timeout: say the proxy was on the way.
        return f"{text} (via proxy {host})", False
    said = {"connection refused": " refused the connection", "connect timed out": " timed out"}
    return f"proxy {host}" + said.get(text, " timed out" if "timed out" in text else ": " + text), False


def _status_in_message(chain: List[BaseException], what: str) -> Optional[int]:
    """A status that only the text of an error tells, as urllib3 1.24 to 2.8 and http.client 3.6 to 3.15 word it.

    ``retry``: a urllib3 Retry mounted on the session gave up on it; ``tunnel``: a proxy answered CONNECT with it.
    """
    pattern = {"retry": r"too many (\d{3}) error responses", "tunnel": r"Tunnel connection failed: (\d{3})"}[what]
    for e in chain:
        found = re.search(pattern, str(e))
        if found:
            return int(found.group(1))
    return None


def _status_class(status: int) -> Type[APIStatusError]:
    return _STATUS_ERRORS.get(status, InternalServerError if 500 <= status < 600 else APIStatusError)


def _redirect_target(source: str, location: str) -> Tuple[str, Optional[str]]:
    """Where a redirect from ``source`` leads, and why it is refused, if it is."""
    try:
        target = urljoin(source, location)
        scheme = _origin(target)[0]
    except ValueError:  # a port out of range or not a number, an IPv6 host not closed
        return location, "refused: not a usable URL"
    if scheme not in ("http", "https"):
        return target, "refused: not an http(s) URL"
    if scheme == "http" and urlsplit(source).scheme == "https":
        return target, "refused: https to http"
    return target, None


@functools.lru_cache(maxsize=16)  # each Client, and each redirect, asks
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
    """Content-Length, None without one or where Transfer-Encoding overrides it (RFC 9112, 6.3).

    :raises ValueError: for a value that is not ASCII digits, nor a list of one such value repeated.
    """
    value = headers.get("Content-Length")
    if value is None or "Transfer-Encoding" in headers:
        return None
    lengths = {length.strip() for length in value.split(",")}  # "239, 239", as some proxies send it
    length = lengths.pop()
    if lengths or not re.fullmatch("[0-9]+", length):
        raise ValueError(f"invalid Content-Length {_excerpt(repr(value))}")
    return int(length) if len(length) <= 18 else 10**18  # past every cap; int() refuses 4300 digits


def _status_message(
    status: int, data: Any, text: str, reason: Optional[str], location: Optional[str], refused: str
) -> str:
    """A status error's message, from the best of what the response says."""
    if 300 <= status < 400 and location:
        return f"{status} {_excerpt(f'redirect to {location!r} {refused}')}"
    text = _api_message(data) or _html_title(text) or _excerpt(text) or reason or "no message"
    text = re.sub(rf"^{status}\b\W*", "", _excerpt(text)) or "no message"  # "502 Bad Gateway", not "502 502 ..."
    return f"{status} {_excerpt(text)}"


def _method(resp: requests.Response) -> str:
    return getattr(resp.request, "method", None) or "GET"


def _incomplete(exc: BaseException) -> bool:
    # urllib3's IncompleteRead, 1.24 to 2.x, is http.client's too.
    return any(isinstance(e, http.client.IncompleteRead) for e in _chain(exc))


def _too_big(size: str) -> str:
    return f"response body of {size} bytes is over the {MAX_BODY_BYTES}-byte limit"


def _retry_after(value: Optional[str], date: Optional[str]) -> Optional[float]:
    """Seconds to wait: a number (a fraction too), else an HTTP date less the answer's own ``Date``
    (RFC 9110, 10.2.3: the gateway's clock, not ours), else None; never an error."""
    if value is None:
        return None
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value.strip()):
        return float(value.strip())  # str.strip takes more than float does: "0\x1f"
    until, now = _http_date(value), _http_date(date)
    return None if until is None or now is None else max(0.0, until - now)


def _http_date(value: Optional[str]) -> Optional[float]:
    """An HTTP date (a Date header) in Unix seconds, or None; never an error."""
    if value is None:
        return None
    import email.utils  # only here: a plain get_batch reads no date

    try:
        date = email.utils.parsedate_tz(value)  # a date with no zone comes back as GMT
        return None if date is None else float(email.utils.mktime_tz(date))
    except (ValueError, OverflowError, TypeError, IndexError):  # a year or an hour out of range
        return None


def _since(reply: "_Reply", started: float) -> Optional[float]:
    """The gateway's time, by its own clock, when a call that began at ``started`` (time.monotonic) began,
    less _GATEWAY_SKEW; None without a Date."""
    now = _http_date(reply.date)
    return None if now is None else now - (time.monotonic() - started) - _GATEWAY_SKEW


def _reused(found: Batch, key: str, same: bool) -> Batch:
    """The batch an idempotency key already names, if it was made from the same input; else the error."""
    if not same:
        message = f"idempotency key {key!r} already names batch {found.id}, made from other input"
        raise IdempotencyKeyError(message + f" ({found.input_file_id} for {found.endpoint})", found)
    return found


def _printable(text: str) -> str:
    """``text`` safe to show on a terminal: control characters, which a server could send, become ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _columns(stream: Any) -> int:
    """The width of the terminal ``stream`` writes to; 80 when it cannot be read."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):  # not a real file, as under pytest's capture
        return 80


class _Output:
    """One run's stdout and stderr, each write whole under ``lock``, and the one status line of ``--wait``
    and ``--results`` on a terminal's stderr.

    The command runs in a worker thread and writes; main()'s thread draws the status line from the
    worker's news, at most every _TICK, and on a Ctrl-C takes the lock, so that no write is half done
    as the run ends, and keeps it, so that none is begun after.
    """

    #: Seconds a Ctrl-C waits for a write under way; one that takes longer is stuck on its reader.
    PATIENCE = 0.5

    def __init__(self) -> None:
        import sys
        import threading

        # Reentrant: a Ctrl-C can land in main()'s own draw, between tick's acquire and its `try`.
        self.lock = threading.RLock()
        self.tty = sys.stderr.isatty()
        #: The batch this run leaves going, once there is one, and the command that picks it up.
        self.resume: Optional[Tuple[str, str]] = None
        self._text: Optional[Callable[[], str]] = None  # the status line's, while it is up
        self._keep = False
        self._shown_at = 0.0
        self._drawn = ""

    def print(self, text: str, *, err: bool = False) -> None:
        """``text`` and a newline on stdout; on stderr, flushed at once (as 3.9 and later do), for os._exit."""
        import sys

        with self.lock:
            print(text, file=sys.stderr if err else sys.stdout, flush=err)

    def show(self, text: Callable[[], str], *, keep: bool, after: float = 0.0) -> None:
        """Put up the status line: ``text()``, drawn now, or ``after`` seconds from now, then anew at each tick.
        Taken down, a ``keep`` line is drawn once more and ended; another is wiped."""
        with self.lock:
            self._text, self._keep, self._shown_at = text, keep, time.monotonic() + after
            if not after:
                self._draw(text())

    def hide(self) -> None:
        with self.lock:
            self._end_status()

    def tick(self) -> None:
        """Draw the status line, if one is up and its text has changed, unless a write holds the lock past half a tick
        (one stuck on its reader: a Ctrl-C must find this thread free)."""
        if self._text is not None and self.lock.acquire(timeout=_TICK / 2):
            try:
                if self._text is not None and time.monotonic() >= self._shown_at:
                    self._draw(self._text())
            finally:
                self.lock.release()

    def interrupted(self) -> int:
        """Say on stderr that the run was interrupted, stdout ending on a whole line; 130, a Ctrl-C's exit code."""
        import sys

        going = "" if self.resume is None else "; batch {} goes on. To pick it up: {}".format(*self.resume)
        line = ("\r\x1b[K" if self.tty else "") + "error: interrupted" + going + "\n"  # wipes the ^C echoed
        if not self.lock.acquire(timeout=self.PATIENCE):
            # The write under way holds its stream's own lock until a reader that stopped reading (a
            # full pipe, a terminal paused by ^S) takes more: go around it, and stdout may end mid-line.
            try:
                os.write(sys.stderr.fileno(), line.encode())
            except (OSError, ValueError):  # no file descriptor, as under pytest's capture: nothing to be stuck on
                sys.stderr.write(line)
            return 130
        self._end_status()
        sys.stderr.write(line)
        sys.stderr.flush()
        self._flush_stdout()
        return 130

    def _draw(self, text: str, end: str = "") -> None:
        """Replace the terminal's line with ``text``, cut one column short of the edge (a full line wraps on
        some terminals, and \\r would then return only to the start of its last part)."""
        import sys

        if self.tty and (text != self._drawn or end):
            self._drawn = text  # first: a Ctrl-C mid-write still wipes what was written
            sys.stderr.write("\r\x1b[K" + _printable(text)[: _columns(sys.stderr) - 1] + end)
            sys.stderr.flush()

    def _end_status(self) -> None:
        """Under the lock: the status line taken down, drawn once more and ended, or wiped."""
        import sys

        if self._text is not None and self._keep:
            self._draw(self._text(), "\n")
        elif self._drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
        self._text, self._drawn = None, ""

    def _flush_stdout(self) -> None:
        """stdout's buffered lines written out, in PATIENCE at most: a reader that stopped reading takes none."""
        import sys
        import threading

        failed: List[BaseException] = []

        def flush() -> None:
            try:
                sys.stdout.flush()
            except BaseException as exc:  # a reader gone, as BrokenPipeError: raised again below
                failed.append(exc)

        flushing = threading.Thread(target=flush, daemon=True)
        flushing.start()
        flushing.join(self.PATIENCE)
        if failed:
            raise failed[0]


# main()'s thread draws the status line this often, while it waits for the worker.
_TICK = 0.1
# The commands beside the BATCH_ID form: their arguments in short, and what each does.
_CLI_COMMANDS = {
    "submit": ("FILE --endpoint EP", "check a JSONL file of requests, upload it and create its batch"),
    "resubmit": ("BATCH_ID", "send what failed in a finished batch again, as a new batch"),
    "list": ("[--limit N]", "this user's batches, newest first, one compact JSON object a line"),
    "cancel": ("BATCH_ID", "cancel a batch; one that has finished is refused (409, exit 1)"),
}
_CLI_USAGE = (
    "".join(
        f"{'usage:' if i == 0 else '      '} python -m mka1_batches {line}\n"
        for i, line in enumerate(
            ["BATCH_ID [--wait] [--results]", *(f"{name} {args}" for name, (args, _) in _CLI_COMMANDS.items())]
        )
    )
    + "Each has --help: python -m mka1_batches --help, python -m mka1_batches submit --help, ...\n"
)
# What each form's --help says: what it does, then its examples and notes.
_CLI_HELP = {
    None: (
        "Print an MKA1 batch as JSON on stdout, or with --results its results as JSON lines, as the\n"
        "server sent them; with --wait, wait for it to finish first.",
        "commands (each has --help):\n"
        + "".join(f"  {name + ' ' + args:<27} {what}\n" for name, (args, what) in _CLI_COMMANDS.items())
        + """
examples:
  python -m mka1_batches batch_abc123 --wait --results | jq -r 'select(.error) | .custom_id'

environment:
  MKA1_API_KEY       the API key (never taken as an argument: arguments show in ps)
  MKA1_BEARER_AUTH   used when MKA1_API_KEY is unset; "Bearer <key>" as MKA1's own CLI sets it
  MKA1_BASE_URL      the gateway, when --base-url is not given

exit codes, of every command:
  0    success (with --wait or --results: the batch ended completed)
  1    API or network error, a malformed results file (the results before it are written), or an
       input FILE that cannot be read or fails the check (nothing is sent; the line is named)
  2    usage error: bad arguments, no token
  3    --wait or --results: the batch ended failed, expired or cancelled (its JSON, or the results it
       has, are still written; stderr says what happened and how many requests finished)
  4    the batch has not finished: with --wait, --max-wait passed first; with --results alone, or
       resubmit, it is still running. It goes on: stderr gives the command that picks it up
  5    submit --wait --results: results are missing for some requests (the first 5 are named)
  130  interrupted (Ctrl-C); a batch goes on, and stderr gives the command that picks it up
  141  stdout or stderr was closed early by its reader, e.g. `| head -n1`; nothing more is written
""",
    ),
    "submit": (
        "Check a JSONL input file, upload it and create its batch, then print the batch as JSON; with\n"
        "--wait, wait for it to finish; with --results too, write its results.",
        """\
examples:
  python -m mka1_batches submit requests.jsonl --endpoint /v1/chat/completions --check
  python -m mka1_batches submit requests.jsonl --endpoint /v1/chat/completions --wait --results > out.jsonl

  A cron job or CI step, safe to run again whenever it stopped: the key names tonight's batch, and
  a second run finds the first's upload and batch instead of paying for another.
  python -m mka1_batches submit requests.jsonl --endpoint /v1/chat/completions \\
      --idempotency-key "nightly-$(date +%F)" --wait --results > out.jsonl

With --results, each custom_id of FILE that came back in neither result file is named (exit 5).
Exit codes and the environment: python -m mka1_batches --help.
""",
    ),
    "resubmit": (
        "Send again, as a new batch, the requests that failed in a finished batch: its error file's\n"
        "lines, 408, 429 and 5xx responses, and requests missing from both files (other statuses would\n"
        "fail again: they are counted, not sent). Print the new batch as JSON; with --wait, wait for it;\n"
        "with --results too, write its results. Run again, it finds the batch it made, unless that one\n"
        "failed, expired or was cancelled.",
        """\
examples:
  python -m mka1_batches resubmit batch_abc123 --wait --results >> out.jsonl

Exit codes and the environment: python -m mka1_batches --help.
""",
    ),
    "list": (
        "Print this user's batches, newest first, one compact JSON object a line.",
        """\
examples:
  python -m mka1_batches list --limit 5 | jq -r '[.id, .status] | @tsv'

Exit codes and the environment: python -m mka1_batches --help.
""",
    ),
    "cancel": (
        "Cancel a batch and print it as JSON (its status: cancelling); the requests it has finished keep\n"
        "their results.",
        """\
examples:
  python -m mka1_batches cancel batch_abc123

Exit codes and the environment: python -m mka1_batches --help.
""",
    ),
}


def _cli_args(argv: List[str], output: _Output) -> Any:
    """The parsed command line, ``run`` being the mode's function; argparse exits 2 on a usage error."""
    import argparse
    import sys

    command = argv[0] if argv and argv[0] in _CLI_COMMANDS else None
    if not argv:
        output.print(_CLI_USAGE.rstrip("\n"), err=True)
        raise SystemExit(2)
    description, epilog = _CLI_HELP[command]
    parser = argparse.ArgumentParser(
        prog="python -m mka1_batches" + ("" if command is None else " " + command),
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
    )
    if command is None:
        versions = f"requests {requests.__version__}, Python {'.'.join(map(str, sys.version_info[:3]))}"
        parser.add_argument("--version", action="version", version=f"mka1-batches {__version__} ({versions})")
    if command in (None, "cancel", "resubmit"):
        batch_id = _cli_type(functools.partial(_batch_id, name="BATCH_ID"), "a batch's id, such as batch_abc123")
        parser.add_argument("batch_id", metavar="BATCH_ID", type=batch_id)
    if command == "submit":
        parser.add_argument("file", metavar="FILE", help="the requests, one JSON object per line")
        parser.add_argument(
            "--endpoint",
            metavar="EP",
            required=True,
            type=_cli_type(_check_endpoint, "one of " + ", ".join(ENDPOINTS)),
            help="the endpoint every line's url names, such as /v1/chat/completions",
        )
        parser.add_argument(
            "--idempotency-key",
            metavar="KEY",
            type=_cli_type(_check_key, "1 to 64 printable ASCII characters"),
            help="your name for this submission: run again, it finds what the first run made",
        )
        parser.add_argument(
            "--metadata",
            metavar="KEY=VALUE",
            action="append",
            default=[],
            type=_cli_type(_cli_pair, "KEY=VALUE"),
            help="a pair of strings to keep on the batch; repeat for more, up to 16",
        )
        count = _cli_type(_cli_count, "a whole number of 1 or more")
        parser.add_argument("--max-concurrency", metavar="N", type=count, help="requests in flight at once")
        parser.add_argument("--check", action="store_true", help="only check the file: nothing is sent")
    if command == "list":
        limit = _cli_type(_cli_count, "a whole number of 1 or more")
        parser.add_argument("--limit", metavar="N", type=limit, default=20, help="at most N batches (20)")
    if command in (None, "submit", "resubmit"):
        seconds = _cli_type(_cli_seconds, "a number of seconds > 0")
        parser.add_argument("--wait", action="store_true", help="poll until the batch reaches a terminal status")
        parser.add_argument("--poll-interval", metavar="S", type=seconds, help="with --wait: seconds between polls (2)")
        parser.add_argument(
            "--max-wait", metavar="S", type=seconds, help="with --wait: give up after S seconds (exit 4)"
        )
        results = ("with --wait: " if command else "") + "write the finished batch's results, one JSON line each"
        parser.add_argument("--results", action="store_true", help=results)
    who = _cli_type(_check_on_behalf_of, "1-150 printable ASCII characters")
    parser.add_argument("--on-behalf-of", metavar="ID", type=who, help="the end user to act for (X-On-Behalf-Of)")
    base_url = _cli_type(_check_base_url, f"an http(s) URL with no query, such as {DEFAULT_BASE_URL!r}")
    parser.add_argument(
        "--base-url", metavar="URL", type=base_url, help=f"default: $MKA1_BASE_URL, else {DEFAULT_BASE_URL}"
    )
    timeout = _cli_type(_cli_timeout, "S or CONNECT,READ, in seconds > 0")
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=timeout,
        default=DEFAULT_TIMEOUT,
        help="connect and read timeout: S, or CONNECT,READ (default: 10,30)",
    )
    near = [name for name in _CLI_COMMANDS if _edits(argv[0], name) <= 2]
    if command is None and near and not argv[0].startswith("-"):  # a mistyped command is not sent as an id
        parser.error(f"argument BATCH_ID: {argv[0]!r} is no command; did you mean {near[0]!r}?")
    args = parser.parse_args(argv if command is None else argv[1:])
    if command in (None, "submit", "resubmit"):
        # Refused rather than taken to imply --wait: that would also change what exit 0 means.
        given = [("--poll-interval", args.poll_interval is not None), ("--max-wait", args.max_wait is not None)]
        if command:  # a batch just created cannot have finished
            given.append(("--results", args.results))
        for option, present in given:
            if present and not args.wait:
                parser.error(f"argument {option}: not allowed without --wait")
        if args.poll_interval is None:
            args.poll_interval = 2.0
    if command == "submit":
        if args.check and args.wait:
            parser.error("argument --wait: not allowed with --check")
        keys = [key for key, _ in args.metadata]
        room = 16 if args.idempotency_key is None else 15  # the key takes one
        if len(keys) > room or CREATE_KEY in keys or len(set(keys)) < len(keys):
            parser.error(f"argument --metadata: up to {room} distinct keys, {CREATE_KEY} not among them")
    runs = {None: _cli_get, "submit": _cli_submit, "list": _cli_list, "cancel": _cli_cancel}
    args.run = runs.get(command, _cli_resubmit)
    args.output = output
    return args


def _cli_type(parse: Callable[[str], Any], expected: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``parse(text)``, or a usage error that names the option, what it takes and the text."""

    def convert(text: str) -> Any:
        import argparse

        try:
            return parse(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"must be {expected}, not {_excerpt(repr(text))}") from None

    return convert


def _cli_pair(text: str) -> Tuple[str, str]:
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise ValueError(text)
    return key, value


def _cli_count(text: str) -> int:
    if int(text) < 1:
        raise ValueError(text)
    return int(text)


def _cli_seconds(text: str) -> float:
    if not _positive(float(text)):  # also refuses nan and inf
        raise ValueError(text)
    return float(text)


def _cli_timeout(text: str) -> _Timeout:
    parts = [_cli_seconds(part) for part in text.split(",")]
    if len(parts) > 2:
        raise ValueError(text)
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _edits(a: str, b: str) -> int:
    """How many letters to add, drop or change to make ``a`` into ``b`` (Levenshtein's distance)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        before, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            before, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, before + (x != y))
    return row[-1]


def _cli_get(client: Client, args: Any) -> int:
    """``BATCH_ID``: the batch, or with --results its results; with --wait, once it has finished."""
    try:
        batch = _cli_wait(client, args.batch_id, args) if args.wait else client.get_batch(args.batch_id)
    except NotFoundError as exc:  # perhaps a mistyped command rather than a batch
        exc.args = (f"{exc}; BATCH_ID is a batch's id, or a command: {', '.join(_CLI_COMMANDS)}",)
        raise
    return _cli_outcome(client, batch, args, None)


def _cli_submit(client: Client, args: Any) -> int:
    """``submit FILE``: check, upload, create; then as ``BATCH_ID`` for the batch made."""
    if args.check:
        count = check_batch_file(args.file, args.endpoint)
        args.output.print(_printable(f"{args.file}: {count} request{'s' if count != 1 else ''}, ready to submit"))
        return 0
    metadata = dict(args.metadata) if args.metadata else None
    # FILE is read twice, no more: to check it and find its sha256 and custom_ids (an upload of the
    # same bytes is found by it before any is sent), then to send it. A pipe cannot be.
    with open(args.file, "rb") as stream:
        if not stream.seekable():
            why = "not a file that can be read twice (a pipe?): it is checked, then sent"
            raise OSError(errno.ESPIPE, why, args.file)
    batch, ids = client._submit(
        args.file, args.endpoint, "24h", metadata, args.max_concurrency, args.idempotency_key, None
    )
    _cli_going(args, batch.id)
    if args.wait:  # its id, before a wait that a Ctrl-C or --max-wait may end
        args.output.print(_printable(f"batch {batch.id} created"), err=True)
        batch = _cli_wait(client, batch.id, args)
    return _cli_outcome(client, batch, args, dict.fromkeys(ids) if args.results else None)


def _cli_resubmit(client: Client, args: Any) -> int:
    """``resubmit BATCH_ID``: what failed, as a new batch; then as ``BATCH_ID`` for that batch."""
    batch = client.get_batch(args.batch_id)
    if not batch.is_terminal:
        _cli_error(args.output, f"batch {batch.id} is {batch.status}, not finished: nothing to resubmit yet")
        return 4
    kept: List[str] = []
    again = client.resubmit_failed(batch, on_kept=lambda result: kept.append(result.custom_id))
    if kept:
        some = ", ".join(kept[:5]) + (", ..." if len(kept) > 5 else "")
        args.output.print(_printable(f"not resent, as they would fail again: {len(kept)} ({some})"), err=True)
    if again is None:
        args.output.print(_printable(f"nothing failed in batch {batch.id}: nothing to resubmit"), err=True)
        return 0
    _cli_going(args, again.id)
    args.output.print(_printable(f"batch {again.id} created from what failed in {batch.id}"), err=True)
    return _cli_outcome(client, _cli_wait(client, again.id, args) if args.wait else again, args, None)


def _cli_list(client: Client, args: Any) -> int:
    """``list``: the newest batches, at most ``--limit``, asking for no page more than that needs."""
    for batch in client.list_batches(page_size=100, limit=args.limit):
        args.output.print(json.dumps(batch.to_dict(), separators=(",", ":")))
    return 0


def _cli_cancel(client: Client, args: Any) -> int:
    """``cancel BATCH_ID``: the batch the gateway answers with."""
    args.output.print(json.dumps(client.cancel_batch(args.batch_id).to_dict(), indent=2))
    return 0


def _cli_wait(client: Client, batch_id: str, args: Any) -> Batch:
    """wait_for_batch, with its status on stderr: on a terminal one line, redrawn; else a line per change."""
    output: _Output = args.output
    command = _cli_going(args, batch_id)
    started = time.monotonic()
    last: List[Batch] = []

    def line() -> str:  # the elapsed time first, so that a narrow terminal still shows the wait is alive
        return f"{int(time.monotonic() - started)}s {_cli_progress(last[0])}"

    def update(batch: Batch) -> None:
        last[:] = [batch]
        if output.tty:
            output.show(line, keep=True)
        else:
            output.print(f"{_cli_progress(batch)}, {int(time.monotonic() - started)}s", err=True)

    try:
        batch = client.wait_for_batch(
            batch_id, poll_interval=args.poll_interval, max_wait=args.max_wait, on_update=update
        )
    except WaitTimeoutError as exc:
        exc.args = (f"{exc}. To pick it up: {command}",)
        raise
    finally:
        output.hide()
    output.resume = None
    return batch


def _cli_going(args: Any, batch_id: str) -> str:
    """The command that picks this batch up; from now on, an interrupted run says that it goes on, and that."""
    import shlex

    words = [batch_id, "--wait", *(["--results"] if args.results else [])]
    words += [*(["--on-behalf-of", args.on_behalf_of] if args.on_behalf_of else [])]
    words += [*(["--base-url", args.base_url] if args.base_url else [])]
    command = "python -m mka1_batches " + " ".join(shlex.quote(word) for word in words)
    args.output.resume = (batch_id, command)
    return command


def _cli_progress(batch: Batch) -> str:
    """``in_progress: 1/3 completed, 0 failed``."""
    counts = batch.request_counts
    done = "no counts yet" if counts is None else f"{counts.completed}/{counts.total} completed, {counts.failed} failed"
    return f"{batch.status}: {done}"


def _cli_outcome(client: Client, batch: Batch, args: Any, expected: Optional[Dict[str, None]]) -> int:
    """The batch's JSON, or with --results its results; then what became of it, and the exit code."""
    output: _Output = args.output
    if not args.results:
        output.print(json.dumps(batch.to_dict(), indent=2))
    elif not batch.is_terminal:
        _cli_error(output, f"batch {batch.id} is {batch.status}, not finished: add --wait")
        return 4
    else:
        _cli_results(client, batch, expected, output)
    ended = 0 if batch.status == "completed" or not (args.wait or args.results) else 3
    if ended:  # what happened, and how many requests finished
        counts = batch.request_counts
        told = {"failed": "failed", "expired": "expired", "cancelled": "was cancelled"}.get(batch.status)
        finished = "no request counts"
        if counts is not None:
            finished = f"{counts.completed + counts.failed} of {counts.total} requests finished"
            finished += f" ({counts.completed} completed, {counts.failed} failed)"
        _cli_error(output, f"batch {batch.id} {told or 'ended ' + batch.status}: {finished}")
        errors = batch.errors.data if batch.errors is not None else ()
        for error in errors[:3]:
            line = "" if error.line is None else f" (line {error.line})"
            _cli_error(output, f"batch {batch.id} failed: {error.code}: {error.message}{line}")
        if len(errors) > 3:
            _cli_error(output, f"... and {len(errors) - 3} more")
    if expected:
        names = ", ".join(str(custom_id) for custom_id in list(expected)[:5]) + (", ..." if len(expected) > 5 else "")
        _cli_error(
            output, f"{len(expected)} request{'s' if len(expected) != 1 else ''} came back in neither file: {names}"
        )
        return ended or 5
    return ended


def _cli_results(client: Client, batch: Batch, expected: Optional[Dict[str, None]], output: _Output) -> None:
    """Write a finished batch's result lines as they came; each one's custom_id leaves ``expected``.

    While a file streams, a terminal's stderr shows the lines and MiB read so far; not when stdout
    is that terminal too: results written there would land in the middle of the line.
    """
    import sys

    read: List[Any] = [""]  # the on_progress of the last line: the file id, lines, bytes read, total

    def progress(*news: Any) -> None:
        if news[0] != read[0]:  # a new file: drawn once it takes longer than a tick
            output.show(lambda: _cli_read_line(*read), keep=False, after=_TICK)
        read[:] = news

    shown = output.tty and not sys.stdout.isatty()
    try:
        pairs: Any = client.iter_result_lines(batch, on_progress=progress if shown else None)
        with contextlib.closing(pairs):  # a reader gone early: the download stops here
            for line_bytes, result in pairs:
                with output.lock:
                    sys.stdout.buffer.write(line_bytes + b"\n")
                if expected is not None:
                    expected.pop(result.custom_id, None)
    finally:
        output.hide()


def _cli_read_line(file_id: str, lines: int, bytes_read: int, total: Optional[int]) -> str:
    """``file-abc: 1234 lines, 1.2 of 256.0 MiB``; the total only when the server sent a length.

    A gzip-encoded file's Content-Length counts encoded bytes, which the decoded ones read
    overtake: then the total is left out rather than shown smaller than what was read.
    """
    read = f"{bytes_read / 2**20:.1f}"
    if total is not None and bytes_read <= total:
        read += f" of {total / 2**20:.1f}"
    return f"{file_id}: {lines} lines, {read} MiB"


def _cli_error(output: _Output, message: str) -> None:
    """One line on stderr, whatever the server put in ``message``."""
    output.print("error: " + _printable(" ".join(message.split())), err=True)


def _cli_run(args: Any, token: str, base_url: str) -> int:
    """The command, in main()'s worker thread: its exit code, and any failure told in one line."""
    import sys

    output: _Output = args.output
    try:
        # One Client, so one Session and one kept-alive connection, from the first call to the last result.
        with Client(token, args.on_behalf_of, base_url=base_url, timeout=args.timeout) as client:
            code: int = args.run(client, args)
        with output.lock:
            sys.stdout.flush()  # here, not at exit, so that a reader gone early is caught in main()
        return code
    except KeyboardInterrupt:  # here only from code that raises it itself, as the tests do
        return output.interrupted()
    except BrokenPipeError:
        raise
    except (MKA1Error, ValueError, OSError) as exc:
        # One line, never a traceback. No message holds the token: the transport keeps it out.
        if isinstance(exc, InvalidBatchFileError):
            name = getattr(args, "file", "the resubmitted input")  # resubmit builds its own
            _cli_error(output, f"{name}{':' if exc.line is None else ''} {exc}")
        elif isinstance(exc, OSError) and exc.filename is not None:  # FILE, named first as every file error
            _cli_error(output, f"{exc.filename}: {(exc.strerror or str(exc)).lower()}")
        else:
            _cli_error(output, str(exc))
        with output.lock:
            sys.stdout.flush()  # the results before a bad line, or a broken connection, are kept
        if isinstance(exc, WaitTimeoutError):
            return 4
        return 1 if isinstance(exc, (MKA1Error, OSError)) else 2


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m mka1_batches``: print a batch, its results, or submit, list and cancel; see ``--help``."""
    output = _Output()  # first, for the try's Ctrl-C; run as a program, the __main__ block takes one before it
    try:
        try:
            import sys
            import threading

            args = _cli_args(sys.argv[1:] if argv is None else argv, output)
            token = os.environ.get("MKA1_API_KEY") or os.environ.get("MKA1_BEARER_AUTH") or ""
            if not token.strip():
                _cli_error(output, "set MKA1_API_KEY (or MKA1_BEARER_AUTH) to your MKA1 API key")
                return 2
            base_url = args.base_url or os.environ.get("MKA1_BASE_URL") or DEFAULT_BASE_URL
            # The work runs in a thread that no Ctrl-C interrupts: Python raises KeyboardInterrupt in
            # the main thread alone, which only waits here. Raised in the work, it could land between
            # a lock's acquire and the `with` that releases it, as in urllib3's pool, and the next
            # taker of that lock, closing the Session on the way out, say, would wait for good.
            ended: List[Union[int, BaseException]] = []

            def work() -> None:
                try:
                    ended.append(_cli_run(args, token, base_url))
                except BaseException as exc:  # raised again below, to main()'s caller
                    ended.append(exc)

            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            while worker.is_alive():
                # In slices: a Ctrl-C cuts a wait short only if the kernel hands it to this thread,
                # and never on Windows; Python runs its handler once the wait ends.
                worker.join(_TICK)
                output.tick()
            if isinstance(ended[0], BaseException):
                raise ended[0]
            return ended[0]
        except KeyboardInterrupt:
            # The worker is left as it is, daemon: closing its Client would take the pool's locks.
            return output.interrupted()
        except RuntimeError as exc:
            # Thread.start waits on a Condition; interrupted as Condition.wait takes its lock back, the
            # `with` around it releases a lock it does not hold, and this replaces the KeyboardInterrupt.
            if not isinstance(exc.__context__, KeyboardInterrupt):
                raise
            return output.interrupted()
    except BrokenPipeError:  # pragma: no cover - the tests run this in subprocesses, over real pipes
        # The reader stopped reading, as `| head -n1` does: no traceback, no error line. The
        # Python docs' recipe: point the streams at devnull, so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover - run as a subprocess by the tests
    code = 130
    try:
        try:
            if signal.getsignal(signal.SIGINT) is _exit_interrupted:  # both from the top of the file
                # From here main() takes a Ctrl-C, as KeyboardInterrupt, and ends the run's output well.
                signal.signal(signal.SIGINT, signal.default_int_handler)
            code = main()
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: its exit code, or argparse's, stands
    except KeyboardInterrupt:  # one that lands just as main() is entered or left, outside its try
        _exit_interrupted()
    if code == 130:
        # Not the interpreter's exit: it flushes sys.stdout, whose lock main()'s worker, left running,
        # may hold mid-write ("could not acquire lock ... at interpreter shutdown", an abort), and
        # runs atexit's logging.shutdown, which takes locks the worker may hold too.
        os._exit(130)
    raise SystemExit(code)
