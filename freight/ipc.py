"""Sending on a ZMQ PUSH socket whose peer may have died.

A PUSH socket with no connected peer (its process is gone) blocks a plain send for good. The
engine-core client and the tensor-parallel executor both send this way: without blocking, and
while the frames cannot go out, asking the caller whether the peer is still there.
"""

from __future__ import annotations

from typing import Callable

_POLL_MS = 5  # between liveness checks while the socket cannot take the frames


def send_while_alive(sock, frames: list, check_alive: Callable[[], None]) -> None:
    """Send frames (one message) on sock; check_alive raises once the peer is known to be gone."""
    import zmq

    while True:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return
        except zmq.Again:
            pass
        check_alive()
        sock.poll(_POLL_MS, zmq.POLLOUT)
