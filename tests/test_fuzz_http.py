"""Property-based fuzzing of the HTTP layer (hypothesis, issue 22): whatever a client sends — arbitrary
bytes as a body, deep nesting, huge numbers, odd unicode, malformed multipart forms, odd headers — the
answer is a 4xx with OpenAI's error envelope (or a 200 for a valid request), never a 5xx, and the
server logs no error or traceback for a client's mistake.

One real server on 127.0.0.1 (tests/serve_helpers.py) for the module; derandomized (a fixed seed) and
without an example database, so every run sends the same cases: 60 per property, 30 where each case
runs a generation or a 20,000-level parse (300 in all). Valid requests that get through run
tiny at 2 steps a stage, so the cases stay cheap."""

from __future__ import annotations

import json
import logging
import socket

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve_helpers import running_server

GEN, VAR = "/v1/images/generations", "/v1/images/variations"
WAIT = 120
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False, max_examples=60,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# cases that each run a generation or parse 20,000 levels: fewer (the suite's time; issue 22 asks 15 min)
FEWER = settings(FUZZ, max_examples=30)
CHEAP = {"prior_steps": 2, "decoder_steps": 2, "super_res_steps": 2}
FIELDS = ["prompt", "n", "seed", "size", "model", "response_format", "user", "prior_steps", "decoder_steps",
          "super_res_steps", "prior_guidance", "decoder_guidance", "use_prior", "image"]


class ErrorLog(logging.Handler):
    """Every record at ERROR or above, from any logger: a client's mistake must cause none."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(tiny_pipeline):
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        with running_server(tiny_pipeline, max_queue=64, max_upload_bytes=64 * 1024) as (url, state):
            yield url, errors
    finally:
        logging.getLogger().removeHandler(errors)


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
        assert "Traceback" not in response.text


def no_errors_logged(errors: ErrorLog) -> None:
    assert not errors.records, [r.getMessage()[:200] for r in errors.records[:3]]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


@FUZZ
@given(body=st.binary(max_size=300))
def test_arbitrary_bytes_as_a_json_body(server, body):
    url, errors = server
    check(httpx.post(url + GEN, content=body, headers={"content-type": "application/json"}, timeout=WAIT))
    no_errors_logged(errors)


@FUZZ
@given(body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), json_values, max_size=6),
       prompt=st.none() | st.text(max_size=60))
def test_arbitrary_json_objects(server, body, prompt):
    url, errors = server
    if prompt is not None:
        body = {**body, "prompt": prompt, **CHEAP}
    check(httpx.post(url + GEN, content=json.dumps(body, allow_nan=True), timeout=WAIT,
                     headers={"content-type": "application/json"}))
    no_errors_logged(errors)


@FEWER
@given(depth=st.integers(min_value=1, max_value=20000), kind=st.sampled_from([b"[", b'{"a":']),
       digits=st.integers(min_value=1, max_value=20000))
def test_deep_nesting_and_long_numbers(server, depth, kind, digits):
    url, errors = server
    close = b"]" if kind == b"[" else b"}"
    for body in (kind * depth + close * depth, b'{"prompt": "a", "seed": ' + b"7" * digits + b"}",
                 b'{"prompt": "a", "decoder_guidance": 1' + b"0" * digits + b".5}"):
        check(httpx.post(url + GEN, content=body, headers={"content-type": "application/json"}, timeout=WAIT))
    no_errors_logged(errors)


@FEWER
@given(prompt=st.text(alphabet=st.characters(codec=None, exclude_categories=()), min_size=0, max_size=200))
def test_odd_unicode_prompts(server, prompt):
    url, errors = server
    body = json.dumps({"prompt": prompt, **CHEAP}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    check(httpx.post(url + GEN, content=body, headers={"content-type": "application/json"}, timeout=WAIT))
    no_errors_logged(errors)


parts = st.lists(st.tuples(st.sampled_from(FIELDS) | st.text(max_size=8), st.binary(max_size=200),
                           st.booleans(), st.sampled_from(["", "image/png", "text/plain", "x/\u00e9"])),
                 max_size=5)


@FUZZ
@given(form=parts, boundary=st.text(alphabet="abcXYZ0123-_'()+,./:=?", min_size=1, max_size=30),
       cut=st.integers(min_value=0, max_value=400), raw_tail=st.binary(max_size=40))
def test_malformed_multipart_forms(server, form, boundary, cut, raw_tail):
    """Forms built by hand (files, text fields, duplicates, odd content types), then possibly cut short
    or followed by junk: the variation route answers 4xx (or 200 for a real PNG form)."""
    url, errors = server
    chunks = []
    for name, value, is_file, ctype in form:
        disposition = f'form-data; name="{name}"' + ('; filename="f.png"' if is_file else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        chunks.append(head.encode("utf-8", "surrogatepass") + b"\r\n" + value + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    body = (body[:cut] if cut < len(body) else body) + raw_tail
    check(httpx.post(url + VAR, content=body, timeout=WAIT,
                     headers={"content-type": f"multipart/form-data; boundary={boundary}"}))
    no_errors_logged(errors)


header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-ABC0123!#$%&'*+.^_`|~", min_size=1, max_size=20)
header_values = st.binary(max_size=100).filter(lambda v: b"\r" not in v and b"\n" not in v and b"\0" not in v)


@FUZZ
@given(headers=st.lists(st.tuples(header_names, header_values), max_size=6),
       method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"BREW"]),
       path=st.sampled_from([b"/v1/images/generations", b"/v1/images/variations", b"/health/ready",
                             b"/metrics", b"/%zz", b"/v1/../etc/passwd", b"/" + b"a" * 300]))
def test_odd_methods_paths_and_headers(server, headers, method, path):
    """Raw requests (no client library cleans them): any answer but a 5xx, as an envelope."""
    url, errors = server
    host, port = url.removeprefix("http://").split(":")
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: x", b"Connection: close"]
    lines += [name.encode() + b": " + value for name, value in headers]
    with socket.create_connection((host, int(port)), timeout=WAIT) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, answer[:300]
    no_errors_logged(errors)
