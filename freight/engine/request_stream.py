"""RequestStream: one request's outputs, handed from the frontend's output thread to asyncio.

deliver() puts items on their streams' queues with one call_soon_threadsafe per event
loop and batch, not one per request: each call writes to the loop's self-pipe, which
adds up at 64+ concurrent streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from typing import TYPE_CHECKING, Optional, Union

from freight.outputs import RequestOutput

if TYPE_CHECKING:
    from freight.engine.async_llm import AsyncLLM


class RequestStream:
    """The outputs of one request, handed from the output thread to an asyncio consumer.

    Iterate it (or await get()) until an output with finished=True; an exception put
    by the output thread is raised to the consumer. abort() is synchronous on purpose:
    it is called from `finally` blocks of cancelled tasks, where awaiting is unsafe.
    """

    def __init__(self, request_id: str, owner: "AsyncLLM", loop: asyncio.AbstractEventLoop,
                 num_prompt_tokens: int):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.loop = loop
        self.finished = False
        self._owner = owner
        self._queue: asyncio.Queue[Union[RequestOutput, BaseException]] = asyncio.Queue()
        self._stash: Optional[RequestOutput] = None

    def _put(self, item: Union[RequestOutput, BaseException]) -> None:  # on the loop's thread
        self._queue.put_nowait(item)

    async def get(self) -> RequestOutput:
        """The next output; when several are queued (a slow consumer), one output with their deltas joined."""
        if self._stash is not None:
            item, self._stash = self._stash, None
        else:
            item = await self._queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            newer = self._queue.get_nowait()
            if isinstance(newer, RequestOutput) and len(newer.delta_text) != len(item.delta_text):
                self._stash = newer  # cannot be joined (never expected): hand it out next time
                break
            item = _merge(item, newer)
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        return await self.get()

    def abort(self) -> None:
        """Abort the request if it has not finished (a client hung up): its blocks are freed next step."""
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)


def _merge(older: RequestOutput, newer: Union[RequestOutput, BaseException]) -> Union[RequestOutput, BaseException]:
    """Fold two consecutive outputs of a request into one (the newer state, both deltas); an error wins."""
    if isinstance(newer, BaseException):
        return newer
    return dataclasses.replace(
        newer, delta_text=[a + b for a, b in zip(older.delta_text, newer.delta_text)],
        delta_token_ids=[a + b for a, b in zip(older.delta_token_ids, newer.delta_token_ids)])


def deliver(items: list[tuple[RequestStream, Union[RequestOutput, BaseException]]]) -> None:
    """Put items on their streams' queues: one call_soon_threadsafe per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
    for stream, item in items:
        by_loop[stream.loop].append((stream, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _put_all(batch: list) -> None:
    for stream, item in batch:
        stream._put(item)
