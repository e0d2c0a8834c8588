"""The scheduler's waiting queue, in the order its scheduling policy admits requests (as vLLM's).

- fcfs: arrival order; a preempted request goes back to the front, to resume first.
- priority: by (priority, arrival time), lower first; a preempted request simply takes its
  place by that key again (vLLM's PriorityRequestQueue does the same).

Both queues iterate in admission order and support `queue[0]`, `in`, `len` and removal of an
arbitrary request (an abort), so the scheduler's admission loop is the same for either.
"""

from __future__ import annotations

import bisect
import enum
from collections import deque
from typing import Iterable, Iterator, Protocol

from freight.core.request import Request


class SchedulingPolicy(str, enum.Enum):
    FCFS = "fcfs"
    PRIORITY = "priority"


class RequestQueue(Protocol):
    def add_request(self, request: Request) -> None: ...
    def prepend_request(self, request: Request) -> None: ...
    def prepend_requests(self, requests: Iterable[Request]) -> None: ...
    def pop_request(self) -> Request: ...
    def remove(self, request: Request) -> None: ...
    def __getitem__(self, index: int) -> Request: ...
    def __iter__(self) -> Iterator[Request]: ...
    def __len__(self) -> int: ...


class FCFSRequestQueue(deque):
    """Arrival order (a deque, so the fcfs path is exactly what it always was)."""

    def add_request(self, request: Request) -> None:
        self.append(request)

    def prepend_request(self, request: Request) -> None:
        self.appendleft(request)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        """Put requests back at the front, keeping their order."""
        self.extendleft(reversed(list(requests)))

    def pop_request(self) -> Request:
        return self.popleft()


def priority_key(request: Request) -> tuple[int, float]:
    return request.priority, request.arrival_time


class PriorityRequestQueue:
    """Sorted by (priority, arrival time); equal keys keep insertion order.

    A sorted list rather than vLLM's heap: the admission loop walks the queue in order
    (skipping requests whose grammar is still compiling), which a heap cannot do cheaply."""

    def __init__(self) -> None:
        self._requests: list[Request] = []

    def add_request(self, request: Request) -> None:
        bisect.insort_right(self._requests, request, key=priority_key)

    # A preempted or skipped request is ordered by its key like any other.
    prepend_request = add_request

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.add_request(request)

    def pop_request(self) -> Request:
        return self._requests.pop(0)

    def remove(self, request: Request) -> None:
        del self._requests[next(i for i, r in enumerate(self._requests) if r is request)]

    def __getitem__(self, index: int) -> Request:
        return self._requests[index]

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def __len__(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __contains__(self, request: object) -> bool:
        return any(r is request for r in self._requests)


def create_request_queue(policy: SchedulingPolicy) -> RequestQueue:
    if policy == SchedulingPolicy.PRIORITY:
        return PriorityRequestQueue()
    if policy == SchedulingPolicy.FCFS:
        return FCFSRequestQueue()
    raise ValueError(f"unknown scheduling policy {policy!r}")
