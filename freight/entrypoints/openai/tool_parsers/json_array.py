"""The reply of tool_choice "required": a bare JSON array of {"name", "parameters"} objects, as the
structured-output schema freight builds from the tools forces it. That is Mistral's array form without
its [TOOL_CALLS] marker, so the Mistral parser reads it, started past the marker. Not a --tool-call-parser."""

from __future__ import annotations

from freight.entrypoints.openai.tool_parsers.base import make_tool_call_id
from freight.entrypoints.openai.tool_parsers.mistral import MistralToolParser, _Mode


class JsonArrayToolParser(MistralToolParser):
    name = "json_array"
    keeps_special_tokens = False

    def __init__(self, tokenizer=None):
        super().__init__(tokenizer)
        self._begin_call("")  # as if the marker had just been read
        self._mode = _Mode.AFTER_MARKER

    @classmethod
    def new_call_id(cls) -> str:
        return make_tool_call_id()

    def _parse(self, text: str):
        return super()._parse(self.marker + text)
