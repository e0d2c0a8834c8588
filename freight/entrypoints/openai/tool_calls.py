"""Tool calling: checking `tools` and `tool_choice`, and the calls a forced choice produces.

tool_choice "required" and a named function are enforced by structured outputs, as in
vLLM: "required" constrains the reply to a JSON array of {"name", "parameters"} objects
(one of the tools each), a named function to that function's parameters schema. "auto"
leaves the model free and a tool parser (--tool-call-parser) finds the calls in its text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from freight.entrypoints.openai.errors import bad_request
from freight.entrypoints.openai.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from freight.entrypoints.openai.tool_parsers.base import make_tool_call_id as tool_call_id
from freight.entrypoints.openai.tool_parsers.json_array import JsonArrayToolParser


@dataclass
class ToolPlan:
    choice: str                                  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's {"type": "function", "function": ...}
    named: Optional[str] = None                  # the forced function's name
    parallel: bool = True                        # parallel_tool_calls: false allows one call at most

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def parameters(self, name: str) -> dict[str, Any]:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or {"type": "object", "properties": {}}

    def constraint(self) -> Optional[dict[str, Any]]:
        """The structured_outputs dict that enforces a forced choice (None for none/auto)."""
        if self.choice == "named":
            return {"json": self.parameters(self.named)}
        if self.choice != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                    "parameters": self.parameters(t["function"]["name"])},
                  "required": ["name", "parameters"]} for t in self.tools]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            array["maxItems"] = 1
        return {"json": array}


def plan_tools(tools: Any, tool_choice: Any, auto_enabled: bool,
               parallel_tool_calls: Optional[bool] = None) -> ToolPlan:
    """Check tools and tool_choice as OpenAI does; "auto" needs a tool parser (vLLM's rule)."""
    plan = _plan(tools, tool_choice, auto_enabled)
    plan.parallel = parallel_tool_calls is not False
    return plan


def _plan(tools: Any, tool_choice: Any, auto_enabled: bool) -> ToolPlan:
    if tools is None:
        if tool_choice not in (None, "none"):
            raise bad_request("'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice")
        return ToolPlan("none")
    checked = [_check_tool(t, i) for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in checked]
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad_request("Invalid 'tool_choice': expected {\"type\": \"function\", \"function\": {\"name\": "
                              "...}}.", param="tool_choice", code="invalid_value")
        if name not in names:
            raise bad_request(f"Invalid 'tool_choice': function {name!r} is not among the tools.",
                              param="tool_choice", code="invalid_value")
        return ToolPlan("named", checked, name)
    if tool_choice not in ("none", "auto", "required"):
        raise bad_request(f"Invalid value for 'tool_choice': {tool_choice!r}. Supported values are: 'none', 'auto', "
                          "'required' or a named function.", param="tool_choice", code="invalid_value")
    if tool_choice == "auto" and not auto_enabled:
        raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set.',
                          param="tool_choice")
    return ToolPlan(tool_choice, checked)


def _check_tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise bad_request(f"Invalid '{where}': expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.",
                          param=where, code="invalid_value")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise bad_request(f"Invalid '{where}.function.parameters': expected a JSON schema object.",
                          param=f"{where}.function.parameters", code="invalid_value")
    return {"type": "function", "function": fn}


def forced_tool_calls(plan: ToolPlan, text: str) -> Optional[list[ToolCall]]:
    """The calls in a forced choice's (grammar-constrained) reply; None if it is incomplete JSON."""
    if plan.choice == "named":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return [ToolCall(id=tool_call_id(), function=FunctionCall(name=plan.named,
                                                                   arguments=json.dumps(value, ensure_ascii=False)))]
    found = JsonArrayToolParser().extract_tool_calls(text)
    return found.tool_calls if found.tools_called and not (found.content or "").strip() else None


class ForcedToolCallStream:
    """Tool-call deltas from a forced choice's reply as it streams, without re-parsing it.

    Named: the reply is the arguments object itself, so its text streams as argument
    fragments after one delta with the id and name. Required: a JSON array of
    {"name": ..., "parameters": {...}}, read incrementally by JsonArrayToolParser."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self._named_started = False
        self._array = JsonArrayToolParser() if plan.choice == "required" else None

    def feed(self, delta: str) -> list[DeltaToolCall]:
        if not delta:
            return []
        if self._array is not None:
            out = self._array.extract_tool_calls_streaming(delta)
            return out.tool_calls if out is not None else []
        out = []
        if not self._named_started:
            self._named_started = True
            out.append(DeltaToolCall(index=0, id=tool_call_id(), type="function",
                                     function=DeltaFunctionCall(name=self.plan.named)))
        out.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta)))
        return out


def template_messages_tool_calls(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as chat templates expect them (arguments as an object)."""
    if not isinstance(tool_calls, list):
        raise bad_request(f"Invalid type for '{where}.tool_calls': expected an array.", param=f"{where}.tool_calls",
                          code="invalid_type")
    out = []
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"Invalid '{where}.tool_calls[{j}]': expected {{\"id\", \"type\": \"function\", "
                              "\"function\": {\"name\", \"arguments\"}}.", param=f"{where}.tool_calls[{j}]",
                              code="invalid_value")
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # templates that print it verbatim still work
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out
