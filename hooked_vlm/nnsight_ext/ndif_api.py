"""Server side, API process: ndif's FastAPI app behind hooked_vlm's guards, and ndif's dispatcher made resilient.

Importable only where the NDIF stack is installed (``scripts/ndif/install.sh``); gunicorn loads it
through ``scripts/ndif/gunicorn_conf.py`` (which must import anyio's asyncio backend before anything
imports nnsight, see there).

``app``: ndif 0.1.2's app wrapped in :class:`GuardMiddleware`, which
  * refuses a request body over the cap (``HOOKED_VLM_NDIF_MAX_REQUEST_MB``) with 413 and a message
    stating size and limit, before the body is read;
  * checks the API key (``HOOKED_VLM_NDIF_API_KEY``) on every route but ``/ping`` when one is set;
  * records each accepted request id in Redis with the server run (boot id) that took it, and answers a
    poll for an id with no stored response with a terminal ERROR response when the id was never
    accepted or was accepted before a restart (nnsight's ``poll()`` otherwise reads 404 as "not yet",
    forever).

``run_dispatcher``: ndif's dispatcher with (a) exponential backoff wherever upstream retries in a tight
loop while Redis is down (its log grew ~4 MB/s), (b) the ``ray:connected`` flag re-asserted after a
Redis restart (upstream sets it once at start-up, so the API answered 503 for good), and (c) pending
non-blocking requests kept in Redis until they answer, re-queued when the dispatcher starts again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import time
from typing import Any, Optional

from hooked_vlm.nnsight_ext import ndif_guard as guard

logger = logging.getLogger("ndif.hooked_vlm")

PENDING_PREFIX = "hvlm:pending:"
CONNECTED_FLAG = "ray:connected"


def boot_id() -> str:
    """The id of this server run (``start.sh`` sets one per start)."""
    return os.environ.get("HOOKED_VLM_NDIF_BOOT_ID", "unset")


def _redis():
    """An async Redis client on ``NDIF_REDIS_URL`` (credentials included in the URL)."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(os.environ.get("NDIF_REDIS_URL", "redis://127.0.0.1:6379"))


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class _TooLarge(Exception):
    """The streamed body passed the cap (no Content-Length to check up front)."""


class GuardMiddleware:
    """Pure ASGI middleware applying :mod:`ndif_guard`'s rules in front of ndif's app."""

    def __init__(self, app) -> None:
        self.app = app
        self.limit = guard.max_request_bytes()
        self.api_key = os.environ.get(guard.API_KEY_ENV) or None
        self._client = None

    @property
    def redis(self):
        if self._client is None:
            self._client = _redis()
        return self._client

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        if path != "/ping" and not guard.api_key_accepted(self.api_key, headers.get(guard.API_KEY_HEADER)):
            presented = headers.get(guard.API_KEY_HEADER)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": guard.api_key_refusal(presented)})
                return
            return await _send_json(send, 401 if presented is None else 403, {"detail": guard.api_key_refusal(presented)})
        if scope["type"] == "http" and scope["method"] == "POST" and path == "/request":
            return await self._request(scope, receive, send, headers)
        if scope["type"] == "http" and scope["method"] == "GET" and path.startswith("/response/"):
            return await self._response(scope, receive, send, path.rsplit("/", 1)[-1])
        return await self.app(scope, receive, send)

    async def _request(self, scope, receive, send, headers: dict) -> None:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit():
            refusal = guard.payload_refusal(int(declared), self.limit)
            if refusal:
                return await _send_json(send, 413, {"detail": refusal})
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        status, chunks, started = 0, [], False

        async def capture(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            elif message["type"] == "http.response.body" and status == 200:
                chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted, capture)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, {"detail": guard.payload_refusal(seen, self.limit)})
            return
        if status == 200:
            try:
                job_id = json.loads(b"".join(chunks))["id"]
                await self.redis.set(guard.JOB_KEY_PREFIX + job_id, boot_id(), ex=guard.JOB_TTL_S)
            except Exception:  # the request is queued either way; a missing record only weakens poll errors
                logger.exception("could not record the accepted job id")

    async def _response(self, scope, receive, send, job_id: str) -> None:
        held: list[dict] = []

        async def hold(message):
            held.append(message)

        await self.app(scope, receive, hold)
        status = next((m["status"] for m in held if m["type"] == "http.response.start"), 0)
        if status == 404:
            try:
                raw = await self.redis.get(guard.JOB_KEY_PREFIX + job_id)
            except Exception as error:  # cannot tell: answer upstream's 404 ("not yet"); the client polls again
                logger.warning(f"job registry unavailable ({type(error).__name__}: {error})")
            else:
                record = guard.JobRecord(raw.decode()) if raw is not None else None
                why = guard.unknown_job_description(job_id, record, boot_id())
                if why is not None:
                    return await _send_json(send, 200, guard.error_response_json(job_id, why))
        for message in held:
            await send(message)


_APP = None


def __getattr__(name: str):
    """``app`` is built on first access (gunicorn's ``module:app``), so the dispatcher process never imports it."""
    global _APP
    if name != "app":
        raise AttributeError(name)
    if _APP is None:
        from ndif.services.api.app import app as ndif_app

        _APP = GuardMiddleware(ndif_app)
    return _APP


# ----- dispatcher -----------------------------------------------------------------------------------------------


class Backoff:
    """Exponential backoff for a retry loop: 0.1 s doubling to ``cap``; reset after ``quiet`` s without failures."""

    def __init__(self, start: float = 0.1, cap: float = 5.0, quiet: float = 30.0) -> None:
        self.start, self.cap, self.quiet = start, cap, quiet
        self.failures, self.last = 0, 0.0

    def next_delay(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        if now - self.last > self.quiet:
            self.failures = 0
        self.last = now
        delay = min(self.cap, self.start * (2 ** self.failures))
        self.failures += 1
        return delay


class _BackoffAsyncio:
    """``asyncio`` for ndif's dispatcher module, where ``sleep(0)`` only follows a failure: back off there."""

    def __init__(self) -> None:
        self._backoff: dict[Any, Backoff] = {}

    def __getattr__(self, name):
        return getattr(asyncio, name)

    async def sleep(self, delay, result=None):
        if delay == 0:
            task = asyncio.current_task()
            delay = self._backoff.setdefault(task.get_name() if task else None, Backoff()).next_delay()
        return await asyncio.sleep(delay, result)


def _resilient_dispatcher_class():
    from ndif.common.providers.ray import RayProvider
    from ndif.common.providers.redis import RedisProvider
    from ndif.services.api.queue import dispatcher as upstream
    from ndif.services.api.queue.config import CONFIG

    upstream.asyncio = _BackoffAsyncio()

    class ResilientDispatcher(upstream.Dispatcher):
        """ndif's dispatcher; see the module docstring for what changes."""

        _fetch_backoff = Backoff()

        async def get(self):
            """Upstream's fetch, except that a Redis error backs off and never drops requests already popped."""
            client = RedisProvider.async_bytes_client
            try:
                result = await client.brpop(CONFIG.queue_key, timeout=CONFIG.fetch_timeout_s)
            except Exception as error:
                delay = self._fetch_backoff.next_delay()
                logger.warning(f"queue fetch failed ({type(error).__name__}: {error}); retrying in {delay:.1f} s")
                await asyncio.sleep(delay)
                raise
            requests = [] if result is None else [pickle.loads(result[1])]
            try:
                while requests and len(requests) < CONFIG.fetch_batch_max:
                    item = await client.rpop(CONFIG.queue_key)
                    if item is None:
                        break
                    requests.append(pickle.loads(item))
                await self._reassert_connected()
            except Exception as error:  # keep what was popped; the next fetch retries (and backs off)
                logger.warning(f"queue batch fetch interrupted ({type(error).__name__}: {error})")
            return requests

        async def _reassert_connected(self) -> None:
            client = RedisProvider.async_client
            if not await client.exists(CONNECTED_FLAG) and RayProvider.connected():
                await client.set(CONNECTED_FLAG, "1")
                logger.info("Redis lost the ray:connected flag (restarted?); Ray is connected: flag set again")

        async def dispatch(self, request) -> None:
            """Keep a copy of a non-blocking request until it answers; on a dispatch failure put it back in front."""
            if not request.session_id:  # nobody waits on a socket, so it can be resumed after a restart
                try:
                    await RedisProvider.async_bytes_client.set(
                        PENDING_PREFIX + request.id, pickle.dumps(request), ex=guard.JOB_TTL_S
                    )
                except Exception as error:
                    logger.warning(f"could not keep a copy of {request.id} ({type(error).__name__}: {error})")
            try:
                await super().dispatch(request)
            except Exception as error:
                backoff = Backoff(start=0.5, cap=5.0)
                for _ in range(6):  # ~20 s: long enough for a Redis restart
                    await asyncio.sleep(backoff.next_delay())
                    try:
                        await RedisProvider.async_bytes_client.rpush(CONFIG.queue_key, pickle.dumps(request))
                        logger.warning(f"dispatch of {request.id} failed ({type(error).__name__}: {error}); re-queued in front")
                        return
                    except Exception:
                        continue
                raise

        async def requeue_pending(self) -> int:
            """Put back every non-blocking request a previous run took but never answered."""
            from ndif.common.providers.objectstore import ObjectStoreProvider

            client = RedisProvider.async_bytes_client
            count = 0
            async for key in client.scan_iter(match=PENDING_PREFIX + "*"):
                request_id = key.decode()[len(PENDING_PREFIX):]
                raw = await asyncio.to_thread(ObjectStoreProvider.get, f"responses/{request_id}.json")
                done = raw is not None and json.loads(raw).get("status") in ("COMPLETED", "ERROR")
                blob = await client.get(key)
                if done or blob is None:
                    await client.delete(key)
                    continue
                request = pickle.loads(blob)
                await client.lpush(CONFIG.queue_key, pickle.dumps(request))
                await RedisProvider.async_client.set(guard.JOB_KEY_PREFIX + request_id, boot_id(), ex=guard.JOB_TTL_S)
                await client.delete(key)
                count += 1
            for raw in await client.lrange(CONFIG.queue_key, 0, -1):  # queued before the restart: still served
                queued = pickle.loads(raw)
                await RedisProvider.async_client.set(guard.JOB_KEY_PREFIX + queued.id, boot_id(), ex=guard.JOB_TTL_S)
            return count

        async def sweep_pending(self, every_s: float = 30.0) -> None:
            """Drop the kept copy of each non-blocking request once its final response is stored."""
            from ndif.common.providers.objectstore import ObjectStoreProvider

            client = RedisProvider.async_bytes_client
            while True:
                await asyncio.sleep(every_s)
                try:
                    async for key in client.scan_iter(match=PENDING_PREFIX + "*"):
                        request_id = key.decode()[len(PENDING_PREFIX):]
                        raw = await asyncio.to_thread(ObjectStoreProvider.get, f"responses/{request_id}.json")
                        if raw is not None and json.loads(raw).get("status") in ("COMPLETED", "ERROR"):
                            await client.delete(key)
                except Exception as error:
                    logger.warning(f"pending sweep failed ({type(error).__name__}: {error})")

        async def dispatch_worker(self) -> None:
            try:
                count = await self.requeue_pending()
                if count:
                    logger.info(f"re-queued {count} pending non-blocking request(s) from before the restart")
            except Exception:
                logger.exception("could not re-queue pending requests")
            asyncio.create_task(self.sweep_pending())
            await super().dispatch_worker()

    return ResilientDispatcher


def run_dispatcher() -> None:
    """Entry point of the spawned dispatcher process (see ``scripts/ndif/gunicorn_conf.py``)."""
    import ndif.common.providers.influx  # noqa: F401  (import connects it, as upstream does)
    import ndif.common.providers.loki  # noqa: F401

    _resilient_dispatcher_class().start()


if __name__ == "__main__":
    run_dispatcher()
