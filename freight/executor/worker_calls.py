"""What an executor asks of a remote worker, and what comes back: plain msgspec data.

The same calls reach a worker process (over ZMQ) and a Ray actor; `handle` carries one
out on a Worker, so both transports run the ranks in exactly the same way.
"""

from __future__ import annotations

from typing import Optional, Union

import msgspec

from freight.step_contract import GrammarOutput, SchedulerOutput


class ExecuteModel(msgspec.Struct, tag=True):
    scheduler_output: SchedulerOutput


class SampleTokens(msgspec.Struct, tag=True):
    grammar: Optional[GrammarOutput]


class DetermineNumBlocks(msgspec.Struct, tag=True):
    pass


class InitializeCache(msgspec.Struct, tag=True):
    num_blocks: int
    max_model_len: int


class Shutdown(msgspec.Struct, tag=True):
    pass


WorkerCall = Union[ExecuteModel, SampleTokens, DetermineNumBlocks, InitializeCache, Shutdown]

# Calls the executor waits on. Steps are fire-and-forget for ranks > 0: rank 0's output is the
# step's output, and a rank that fails dies (its group cannot go on), which the executor notices.
REPLIED = (DetermineNumBlocks, InitializeCache)


class WorkerReply(msgspec.Struct):
    rank: int
    value: Optional[int] = None
    error: Optional[str] = None


_encoder = msgspec.msgpack.Encoder()
_call_decoder = msgspec.msgpack.Decoder(WorkerCall)
_reply_decoder = msgspec.msgpack.Decoder(WorkerReply)


def encode(msg: Union[WorkerCall, WorkerReply]) -> bytes:
    return _encoder.encode(msg)


def decode_call(data: bytes) -> WorkerCall:
    return _call_decoder.decode(data)


def decode_reply(data: bytes) -> WorkerReply:
    return _reply_decoder.decode(data)


def handle(worker, call: WorkerCall) -> Optional[int]:
    """Carry out a call on a Worker; the value to reply with, if the call has one."""
    if isinstance(call, ExecuteModel):
        worker.execute_model(call.scheduler_output)
    elif isinstance(call, SampleTokens):
        worker.sample_tokens(call.grammar)
    elif isinstance(call, DetermineNumBlocks):
        return worker.determine_num_blocks()
    elif isinstance(call, InitializeCache):
        worker.initialize_cache(call.num_blocks, call.max_model_len)
    return None
