"""A stdlib-only smoke test over real sockets, for where pytest cannot run.

The 3.6-rhel8 job in .ci/run uses it: RHEL 8's attrs 17.4 is older than any pytest that runs
on Python 3.6 accepts. It drives the installed requests, urllib3 and attrs against the
stand-in gateway on 127.0.0.1:

    python .ci/smoke.py          # from the repository root; exit 1 if any check fails

It must itself run on Python 3.6: no dataclasses, no walrus, no f-string "=", and no
capture_output or text= in subprocess calls.
"""

# ruff: noqa: S101, S603, UP021 - plain asserts are the point here; the subprocess runs
# sys.executable; and Python 3.6 has universal_newlines= but no text=.

import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mka1_batches  # noqa: E402 - needs ROOT on the path first
from standin_gateway import DEMO_TOKEN, Gateway  # noqa: E402

CHECKS = []


def raises(cls, fn, *args, **kwargs):
    """The exception of class cls that fn raises; AssertionError if it raises none."""
    try:
        fn(*args, **kwargs)
    except cls as e:
        return e
    raise AssertionError(f"no {cls.__name__} raised")


def check(fn):
    """Register a check: a function of the running gateway that raises on failure."""
    CHECKS.append(fn)
    return fn


@check
def a_completed_batch(gw):
    batch = mka1_batches.get_batch(DEMO_TOKEN, "batch_x", base_url=gw.base_url)
    assert batch.id == "batch_x", batch
    assert batch.status == "completed", batch
    assert batch.is_terminal
    counts = batch.request_counts
    assert counts.total == 3 and counts.completed + counts.failed == 3, counts
    assert batch.request_id, "no X-Request-ID kept"
    # The field this version does not know is kept, not dropped.
    assert batch.extra.get("max_concurrency") == 8, batch.extra


@check
def the_results_stream_and_resume(gw):
    batch = mka1_batches.get_batch(DEMO_TOKEN, "batch_x", base_url=gw.base_url)
    results = list(mka1_batches.iter_results(DEMO_TOKEN, batch, base_url=gw.base_url))
    assert [r.custom_id for r in results] == ["request-3", "request-1", "request-2"], results
    assert results[2].response is None and results[2].error.code == "processing_error", results[2]
    # file-cut-N breaks mid-way on the first read: every line once, in order, none skipped.
    ids = [r.custom_id for r in mka1_batches.iter_file(DEMO_TOKEN, "file-cut-200", base_url=gw.base_url)]
    assert ids == [f"request-{i}" for i in range(1, 201)], ids[:3]


@check
def a_404_is_not_found_error(gw):
    # The stand-in answers 404 for any id it does not list.
    e = raises(mka1_batches.NotFoundError, mka1_batches.get_batch, DEMO_TOKEN, "nope", base_url=gw.base_url)
    assert e.status_code == 404, e.status_code
    assert "Batch not found" in str(e), str(e)


@check
def a_429_is_retried_after_retry_after(gw):
    slept = []
    real_sleep = mka1_batches._sleep
    mka1_batches._sleep = slept.append  # record the wait instead of waiting
    try:
        batch = mka1_batches.get_batch(DEMO_TOKEN, "batch_ratelimited", base_url=gw.base_url)
    finally:
        mka1_batches._sleep = real_sleep
    assert batch.status == "completed", batch
    assert slept == [1.0], slept  # the stand-in's Retry-After: 1, honoured once
    asked = [r["path"] for r in gw.requests if r["path"].endswith("/batch_ratelimited")]
    assert len(asked) == 2, asked


@check
def a_submitted_batch_is_made_once_whatever_fails(gw):
    # RHEL 8's requests 2.20 and urllib3 1.24 carry the streamed multipart upload; the gateway
    # makes the batch, then answers 502: the create finds it rather than making a second.
    work = tempfile.mkdtemp()
    try:
        path = os.path.join(work, "requests.jsonl")
        with open(path, "w") as f:
            for n in range(1, 4):
                f.write(f'{{"custom_id": "r{n}", "method": "POST", "url": "/v1/chat/completions", "body": {{}}}}\n')
        assert mka1_batches.check_batch_file(path, "/v1/chat/completions") == 3
        gw.write_faults = [None, "502"]
        with mka1_batches.Client(DEMO_TOKEN, base_url=gw.base_url) as client:
            batch = client.submit_batch(path, "/v1/chat/completions", metadata={"smoke": "1"})
            assert [b["id"] for b in gw.created_batches()] == [batch.id], gw.created_batches()
            with open(path, "rb") as f:
                assert gw.file_data(batch.input_file_id) == f.read()
            done = client.wait_for_batch(batch.id, poll_interval=0.01)
            assert sorted(r.custom_id for r in client.iter_results(done)) == ["r1", "r2", "r3"]
            again = client.resubmit_failed("batch_partial")
            assert again.metadata[mka1_batches.RESUBMIT_KEY] == "batch_partial", again.metadata
    finally:
        shutil.rmtree(work)


class _Redirect(http.server.BaseHTTPRequestHandler):
    LOCATION = "http://127.0.0.1:9/elsewhere"

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.LOCATION)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@check
def a_redirect_is_refused(gw):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        e = raises(mka1_batches.APIStatusError, mka1_batches.get_batch, DEMO_TOKEN, "batch_x", base_url=url)
    finally:
        server.shutdown()
        server.server_close()
    assert e.status_code == 302, e.status_code
    assert _Redirect.LOCATION in str(e), str(e)


# The vendored copy: mka1_batches.py alone in a directory, plus its dependencies and theirs,
# in a Python that sees nothing else (-S: no site-packages, -E: no PYTHONPATH).
VENDORED_DEPENDENCIES = ("requests", "attr", "urllib3", "idna", "chardet", "charset_normalizer", "certifi")
VENDORED_RUN = """
import sys
sys.path[:0] = [{vendor!r}, {deps!r}]
import mka1_batches, requests, attr
assert mka1_batches.__file__.startswith({vendor!r}), mka1_batches.__file__
assert requests.__file__.startswith({deps!r}), requests.__file__
assert attr.__file__.startswith({deps!r}), attr.__file__
batch = mka1_batches.get_batch({token!r}, "batch_x", base_url={url!r})
print("vendored:", batch.id, batch.status)
"""


@check
def the_vendored_copy_alone_on_the_path(gw):
    tmp = tempfile.mkdtemp()
    try:
        vendor, deps = os.path.join(tmp, "vendor"), os.path.join(tmp, "deps")
        os.makedirs(vendor)
        shutil.copy(os.path.join(ROOT, "mka1_batches.py"), vendor)
        for name in VENDORED_DEPENDENCIES:
            try:
                module = __import__(name)
            except ImportError:  # requests uses chardet or charset_normalizer: one is enough
                continue
            package = os.path.dirname(module.__file__)
            shutil.copytree(package, os.path.join(deps, name))
            # A mypyc-compiled package (charset_normalizer 3) needs its runtime, which lies
            # beside it as <hash>__mypyc.<abi>.so.
            for entry in os.listdir(os.path.dirname(package)):
                if "__mypyc" in entry:
                    shutil.copy(os.path.join(os.path.dirname(package), entry), deps)
        code = VENDORED_RUN.format(vendor=vendor, deps=deps, token=DEMO_TOKEN, url=gw.base_url)
        proc = subprocess.run(
            [sys.executable, "-S", "-E", "-c", code],
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            universal_newlines=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout
        assert proc.stdout.strip() == "vendored: batch_x completed", proc.stdout
    finally:
        shutil.rmtree(tmp)


def main():
    import attr
    import requests
    import urllib3

    print(
        f"smoke: python {sys.version.split()[0]} | requests {requests.__version__}"
        f" | urllib3 {urllib3.__version__} | attrs {attr.__version__}"
    )
    passed = failed = 0
    with Gateway() as gw:
        for fn in CHECKS:
            try:
                fn(gw)
            except Exception:
                failed += 1
                print("FAIL", fn.__name__)
                traceback.print_exc(file=sys.stdout)
            else:
                passed += 1
                print("ok  ", fn.__name__)
    print(f"smoke: {passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
