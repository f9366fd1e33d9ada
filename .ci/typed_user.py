"""A user's typed script: the gates job checks it with `mypy --strict` against the INSTALLED
mka1_batches (`pip install .`), from a directory without the checkout's copy, with the one
setting a user adds for a single-file module (PEP 561 covers packages only):

    [mypy-mka1_batches]
    follow_untyped_imports = True

Without it, mypy stops at "module is installed, but missing library stubs or py.typed
marker". It is never run, only type-checked.
"""

from typing import List, Optional

from mka1_batches import (
    APIConnectionError,
    APIStatusError,
    Batch,
    NotFoundError,
    RateLimitError,
    WaitTimeoutError,
    get_batch,
    wait_for_batch,
)

BASE_URL = "http://127.0.0.1:8080"


def summary(batch: Batch) -> str:
    counts = batch.request_counts  # None while a batch validates, on some servers
    done: int = 0 if counts is None else counts.completed + counts.failed
    total: Optional[int] = None if counts is None else counts.total
    errors: List[str] = [] if batch.errors is None else [e.message for e in batch.errors.data]
    created: int = batch.created_at
    output: Optional[str] = batch.output_file_id
    request_id: Optional[str] = batch.request_id
    # Proof that mypy sees the real types rather than Any: were `status` Any, this ignore
    # would be unused, and --strict (warn_unused_ignores) would fail.
    wrong: int = batch.status  # type: ignore[assignment]
    return f"{batch.id} {batch.status} {done}/{total} {errors} {created} {output} {request_id} {wrong}"


def fetch(token: str, batch_id: str) -> Optional[Batch]:
    try:
        return get_batch(token, batch_id, base_url=BASE_URL, timeout=(3.05, 10), max_retries=1)
    except NotFoundError:
        return None
    except RateLimitError as e:
        wait: Optional[float] = e.retry_after
        raise SystemExit(f"slow down: {wait}") from e
    except APIStatusError as e:
        code: int = e.status_code
        raise SystemExit(f"{code} {e.request_id} {e.body!r}") from e
    except APIConnectionError as e:
        raise SystemExit(str(e)) from e


def wait(token: str, batch_id: str) -> str:
    def show(batch: Batch) -> None:
        print(batch.status, batch.is_terminal)

    try:
        batch = wait_for_batch(token, batch_id, poll_interval=0.5, max_wait=30.0, on_update=show, base_url=BASE_URL)
    except WaitTimeoutError as e:
        last: Optional[Batch] = e.batch
        return "timed out" if last is None else summary(last)
    return summary(batch)
