"""The live status page: GET / and /status (the page), /status/events (SSE), /status/snapshot (JSON).

The page is one static HTML file with an inline script (static/status.html: no build step,
nothing fetched from elsewhere). It holds no data itself, so it is served without the API
key (a browser cannot add an Authorization header to a navigation); the data endpoints
need the key like the API, and the page sends it from a key field kept in localStorage.

While a client reads /status/events the engine cores are asked for snapshots (a lease,
renewed here); with nobody watching they build none (engine/status_feed.py).
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import AsyncIterator, Optional

import msgspec
from fastapi import FastAPI
from starlette.responses import HTMLResponse, Response, StreamingResponse

from freight.core.status import MIN_INTERVAL_S
from freight.engine.async_llm import AsyncLLM
from freight.engine.status_feed import StatusFeed

# The page itself: reachable without the API key (see above); everything under /status/ is not.
PAGE_PATHS = frozenset({"/", "/status"})
HEARTBEAT_S = 1.0           # an event at least this often, even when no core sent anything new
SNAPSHOT_WAIT_S = 2.0       # the longest a snapshot request or a new stream waits for fresh snapshots
_POLL_S = MIN_INTERVAL_S / 2


def load_page() -> str:
    return resources.files("freight.entrypoints.openai").joinpath("static/status.html").read_text(encoding="utf-8")


def mount_status_page(app: FastAPI, async_llm: AsyncLLM) -> StatusFeed:
    feed = StatusFeed(async_llm)
    async_llm.output_observers.append(feed.observe)
    page = load_page()
    encode = msgspec.json.Encoder().encode

    @app.get("/", include_in_schema=False)
    @app.get("/status", include_in_schema=False)
    async def status_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/status/snapshot", include_in_schema=False)
    async def status_snapshot() -> Response:
        """One snapshot, built by every engine core after this call (or the latest, after SNAPSHOT_WAIT_S)."""
        asked = time.monotonic()
        deadline = asked + SNAPSHOT_WAIT_S
        while time.monotonic() < deadline:
            feed.keep_watching()
            if all(s is not None and s.time >= asked for s in feed.latest()):
                break
            await asyncio.sleep(_POLL_S)
        return Response(encode(feed.snapshot()), media_type="application/json")

    @app.get("/status/events", include_in_schema=False)
    async def status_events() -> StreamingResponse:
        return StreamingResponse(_events(feed, encode), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return feed


async def _events(feed: StatusFeed, encode) -> AsyncIterator[bytes]:
    """An event whenever an engine core sent a new snapshot (at most every MIN_INTERVAL_S), or a heartbeat.

    Starlette cancels this generator when the client goes away, which ends the lease renewals. It ends
    by itself when the server shuts down: uvicorn's graceful shutdown waits for every open response."""
    connected = time.monotonic()
    last_seen: Optional[list] = None
    last_sent = 0.0
    while feed.is_open:
        feed.keep_watching()
        seen = [s.time if s is not None else None for s in feed.latest()]
        now = time.monotonic()
        if last_seen is None:  # the first event: snapshots made for this watcher (the last may be long stale)
            due = all(t is not None and t >= connected for t in seen) or now - connected >= SNAPSHOT_WAIT_S
        else:
            due = now - last_sent >= MIN_INTERVAL_S and (seen != last_seen or now - last_sent >= HEARTBEAT_S)
        if due:
            last_seen, last_sent = seen, now
            yield b"data: " + encode(feed.snapshot()) + b"\n\n"
        await asyncio.sleep(_POLL_S)
