"""One chat choice's text -> message parts: reasoning, content and tool calls.

The reasoning parser (--reasoning-parser) takes the <think> part first; what follows goes
to the tool stage: a forced tool_choice's JSON (required / named function), the tool parser
(--tool-call-parser, for tool_choice "auto"), or plain content. Streaming feeds each
text delta through the same stages incrementally, one parser instance per choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from freight.entrypoints.openai.protocol import DeltaMessage, ToolCall
from freight.entrypoints.openai.tool_calls import ForcedToolCallStream, ToolPlan, forced_tool_calls


@dataclass
class ChatParsers:
    """The server's parser settings (serve flags)."""

    tool_parser: Optional[type] = None         # a ToolParser class (--tool-call-parser)
    reasoning_parser: Optional[type] = None    # a ReasoningParser class (--reasoning-parser)
    enable_auto_tool_choice: bool = False


@dataclass
class ChatReply:
    content: Optional[str]
    reasoning_content: Optional[str]
    tool_calls: list[ToolCall]


def merge_deltas(parts: list[Optional[DeltaMessage]]) -> Optional[DeltaMessage]:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    content = "".join(p.content or "" for p in parts)
    reasoning = "".join(p.reasoning_content or "" for p in parts)
    calls = [c for p in parts for c in p.tool_calls]
    if not content and not reasoning and not calls:
        return None
    return DeltaMessage(content=content or None, reasoning_content=reasoning or None, tool_calls=calls)


class ChoiceParser:
    def __init__(self, plan: ToolPlan, parsers: ChatParsers, tokenizer,
                 chat_template_kwargs: Optional[dict] = None):
        self.plan = plan
        # (qwen3 reads enable_thinking from the template kwargs: off, the prompt holds an empty think block)
        self.reasoning = (parsers.reasoning_parser(tokenizer, chat_template_kwargs=chat_template_kwargs)
                          if parsers.reasoning_parser else None)
        self.tools = (parsers.tool_parser(tokenizer) if plan.choice == "auto" and parsers.tool_parser else None)
        self.forced = ForcedToolCallStream(plan) if plan.forced else None
        self.called = False  # a tool call was produced (finish_reason "tool_calls")

    # -- whole replies -------------------------------------------------------------
    def full(self, text: str) -> ChatReply:
        reasoning = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.extract_reasoning(text)
            text = text or ""
        calls: list[ToolCall] = []
        content: Optional[str] = text
        if self.plan.forced:
            parsed = forced_tool_calls(self.plan, text)
            if parsed is not None:  # None: cut short (length), the text goes back as content
                calls, content = parsed, None
        elif self.tools is not None:
            found = self.tools.extract_tool_calls(text)
            if found.tools_called:
                calls, content = found.tool_calls, found.content
                if not self.plan.parallel:
                    calls = calls[:1]  # parallel_tool_calls: false
        self.called = bool(calls)
        return ChatReply(content, reasoning, calls)

    # -- streams ---------------------------------------------------------------------
    def delta(self, text: str) -> Optional[DeltaMessage]:
        if not text:
            return None
        if self.reasoning is None:
            return self._tool_stage(text)
        if self.reasoning.is_reasoning_end():
            return self._tool_stage(text)
        step = self.reasoning.extract_reasoning_streaming(text)
        if step is None:
            return None
        return merge_deltas([DeltaMessage(reasoning_content=step.reasoning_content),
                       self._tool_stage(step.content) if step.content else None])

    def finish(self) -> Optional[DeltaMessage]:
        parts: list[Optional[DeltaMessage]] = []
        if self.reasoning is not None:
            tail = self.reasoning.finish_streaming()
            if tail is not None:
                parts.append(DeltaMessage(reasoning_content=tail.reasoning_content))
                if tail.content:
                    parts.append(self._tool_stage(tail.content))
        if self.tools is not None:
            parts.append(self.tools.finish_streaming())
            self.called = self.called or self.tools.streamed_tool_calls
        return merge_deltas(parts)

    def _tool_stage(self, text: str) -> Optional[DeltaMessage]:
        if self.forced is not None:
            calls = self.forced.feed(text)
            self.called = self.called or bool(calls)
            return DeltaMessage(tool_calls=calls) if calls else None
        if self.tools is not None:
            out = self.tools.extract_tool_calls_streaming(text)
            self.called = self.called or self.tools.streamed_tool_calls
            if out is not None and not self.plan.parallel and any(c.index > 0 for c in out.tool_calls):
                out = merge_deltas([DeltaMessage(content=out.content,
                                                 tool_calls=[c for c in out.tool_calls if c.index == 0])])
            return out
        return DeltaMessage(content=text)

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        # As OpenAI and vLLM: a named tool_choice ends with "stop", calls the model chose with "tool_calls".
        return "tool_calls" if reason == "stop" and self.called and self.plan.choice != "named" else reason
