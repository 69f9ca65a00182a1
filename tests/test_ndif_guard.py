"""The NDIF guard rules (payload cap, API key, bind check, job ids, client errors, backoff) without a server.

``GuardMiddleware`` runs here in front of a stand-in ASGI app with an in-memory Redis, so each rule is
checked in milliseconds; tests/test_ndif_remote.py checks the same rules against the real stack.
"""

from __future__ import annotations

import asyncio
import json
import traceback

import pytest

from hooked_vlm.nnsight_ext import ndif_guard as guard
from hooked_vlm.nnsight_ext.ndif_api import Backoff, GuardMiddleware

MIB = 1 << 20


def test_max_request_bytes_default_and_override():
    assert guard.max_request_bytes({}) == 512 * 1048576
    assert guard.max_request_bytes({guard.MAX_REQUEST_ENV: "1.5"}) == 1572864
    with pytest.raises(ValueError, match="must be a positive number of MiB"):
        guard.max_request_bytes({guard.MAX_REQUEST_ENV: "0"})
    with pytest.raises(ValueError, match="is not a number of MiB"):
        guard.max_request_bytes({guard.MAX_REQUEST_ENV: "lots"})


def test_payload_refusal_states_size_and_limit():
    assert guard.payload_refusal(96 * MIB, 96 * MIB) is None
    message = guard.payload_refusal(380 * MIB + MIB // 2, 96 * MIB)
    assert message.startswith("request body is 380.5 MiB, over this server's limit of 96.0 MiB")
    assert guard.MAX_REQUEST_ENV in message


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.2", False), ("example.org", False)],
)
def test_is_loopback_host(host, loopback):
    assert guard.is_loopback_host(host) is loopback


def test_check_bind_needs_a_key_beyond_loopback():
    guard.check_bind("127.0.0.1", None)
    guard.check_bind("0.0.0.0", "k3y")
    with pytest.raises(PermissionError, match="refusing to bind the NDIF API to 0.0.0.0: beyond loopback an API key"):
        guard.check_bind("0.0.0.0", None)
    with pytest.raises(PermissionError, match="HOOKED_VLM_NDIF_API_KEY"):
        guard.check_bind("192.168.1.7", "")


def test_api_key_accepted():
    assert guard.api_key_accepted(None, None) and guard.api_key_accepted("", "anything")
    assert guard.api_key_accepted("s3cret", "s3cret")
    assert not guard.api_key_accepted("s3cret", None)
    assert not guard.api_key_accepted("s3cret", "s3cre")
    assert not guard.api_key_accepted("s3cret", "s3cret ")


def test_unknown_job_description():
    assert guard.unknown_job_description("abc", guard.JobRecord("boot1"), "boot1") is None
    never = guard.unknown_job_description("abc", None, "boot1")
    assert never.startswith("unknown job id abc: this NDIF server never accepted")
    lost = guard.unknown_job_description("abc", guard.JobRecord("boot0"), "boot1")
    assert lost.startswith("job abc was accepted before the server restarted") and "retryable" in lost


def _frames(*specs):
    return [traceback.FrameSummary(f, n, name, line=line) for f, n, name, line in specs]


def test_format_client_error_user_line_first_internal_frames_trimmed():
    roots = ("/srv/venv/lib/python3.11/site-packages/", "/usr/lib/python3.11/")
    frames = _frames(
        ("/srv/venv/lib/python3.11/site-packages/ndif/base.py", 10, "run", "self.execute()"),
        ("/srv/venv/lib/python3.11/site-packages/nnsight/tracer.py", 20, "execute", "fn()"),
        ("/home/me/experiment.py", 7, "<module>", "    y = x @ w"),
        ("/srv/venv/lib/python3.11/site-packages/torch/functional.py", 30, "matmul", "op()"),
    )
    text = guard.format_client_error("RuntimeError", "shapes cannot be multiplied (7x64 and 3x3)", frames, roots)
    assert text.splitlines() == [
        "RuntimeError: shapes cannot be multiplied (7x64 and 3x3)",
        "in your trace:",
        '  File "/home/me/experiment.py", line 7, in <module>',
        "    y = x @ w",
        "(3 server-internal frames trimmed)",
    ]


def test_format_client_error_is_bounded():
    frames = _frames(*[(f"/home/me/f{i}.py", i, "g", "x" * 300) for i in range(40)])
    text = guard.format_client_error("ValueError", "bad", frames, ())
    assert text.startswith("ValueError: bad\n") and len(text) <= guard.MAX_CLIENT_ERROR_CHARS + 20
    assert "(35 earlier frames of your trace trimmed)" in text  # only the last five user frames are shown
    assert "server-internal" not in text


def test_client_error_message_from_a_real_exception():
    def inner():
        raise KeyError("blocks.99")

    try:
        inner()
    except KeyError as error:
        text = guard.client_error_message(error)
    first, *rest = text.splitlines()
    assert first == "KeyError: 'blocks.99'"
    assert any("test_ndif_guard.py" in line and "inner" in line for line in rest)


def test_backoff_doubles_to_a_cap_and_resets_after_quiet():
    b = Backoff(start=0.1, cap=1.0, quiet=30.0)
    delays = [b.next_delay(now=float(t)) for t in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert b.next_delay(now=100.0) == pytest.approx(0.1)


# ----- GuardMiddleware in front of a stand-in app ---------------------------------------------------------------


class FakeRedis:
    def __init__(self):
        self.data: dict[str, bytes] = {}

    async def set(self, key, value, ex=None):
        self.data[key] = value.encode() if isinstance(value, str) else value

    async def get(self, key):
        return self.data.get(key)


async def stand_in_app(scope, receive, send):
    """POST /request: reads the body, answers {"id": "job1"}; GET /response/job9: a stored response; else 404."""
    if scope["path"] == "/request":
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, payload = 200, {"id": "job1", "status": "RECEIVED", "size": len(body)}
    elif scope["path"] == "/response/job9":
        status, payload = 200, {"id": "job9", "status": "COMPLETED"}
    else:
        status, payload = 404, {"detail": "No response"}
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": data})


def call(middleware, method, path, body=b"", headers=(), chunks=1, declare_length=True):
    scope_headers = [(k.encode(), v.encode()) for k, v in headers]
    if declare_length:
        scope_headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": scope_headers}
    step = max(1, len(body) // chunks)
    parts = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


@pytest.fixture
def middleware(monkeypatch):
    monkeypatch.setenv(guard.MAX_REQUEST_ENV, "1")  # 1 MiB cap
    monkeypatch.setenv("HOOKED_VLM_NDIF_BOOT_ID", "boot1")
    monkeypatch.delenv(guard.API_KEY_ENV, raising=False)
    m = GuardMiddleware(stand_in_app)
    m._client = FakeRedis()
    return m


def test_middleware_refuses_a_declared_oversized_body(middleware):
    status, body = call(middleware, "POST", "/request", b"x" * (MIB + 1))
    assert status == 413
    assert body["detail"].startswith("request body is 1.0 MiB, over this server's limit of 1.0 MiB")
    assert middleware._client.data == {}


def test_middleware_refuses_a_streamed_oversized_body(middleware):
    status, body = call(middleware, "POST", "/request", b"x" * (2 * MIB), chunks=4, declare_length=False)
    assert status == 413 and "over this server's limit of 1.0 MiB" in body["detail"]


def test_middleware_passes_a_body_under_the_cap_and_records_the_job(middleware):
    status, body = call(middleware, "POST", "/request", b"x" * MIB)
    assert status == 200 and body["size"] == MIB
    assert middleware._client.data == {guard.JOB_KEY_PREFIX + "job1": b"boot1"}


def test_middleware_poll_of_unknown_and_lost_jobs_is_a_terminal_error(middleware):
    assert call(middleware, "GET", "/response/job9") == (200, {"id": "job9", "status": "COMPLETED"})
    status, body = call(middleware, "GET", "/response/nope")
    assert status == 200 and body["status"] == "ERROR" and body["description"].startswith("unknown job id nope")
    middleware._client.data[guard.JOB_KEY_PREFIX + "old"] = b"boot0"
    assert "before the server restarted" in call(middleware, "GET", "/response/old")[1]["description"]
    middleware._client.data[guard.JOB_KEY_PREFIX + "fresh"] = b"boot1"
    assert call(middleware, "GET", "/response/fresh") == (404, {"detail": "No response"})  # not yet: keep polling


def test_middleware_api_key(middleware):
    middleware.api_key = "s3cret"
    status, body = call(middleware, "GET", "/connected")
    assert status == 401 and body["detail"].startswith("this NDIF server requires an API key")
    status, body = call(middleware, "GET", "/connected", headers=[("ndif-api-key", "wrong")])
    assert status == 403 and "not this server's key" in body["detail"]
    assert call(middleware, "GET", "/response/job9", headers=[("ndif-api-key", "s3cret")])[0] == 200
    assert call(middleware, "GET", "/ping")[0] == 404  # /ping passes unauthenticated (404 from the stand-in)
