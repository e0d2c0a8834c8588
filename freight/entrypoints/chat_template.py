"""A chat template given by the user (--chat-template, LLM.chat(chat_template=...)): a file or the text itself.

As vLLM's load_chat_template: a value that opens as a file is read from it; one that does
not, but holds no Jinja characters, was meant as a path, so it is an error; anything else
is the template itself, with escapes such as \\n decoded (shells pass them literally). The
template is parsed here, so a broken one fails at start-up and not on the first request.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Optional

import jinja2

_JINJA_CHARS = "{}\n"


class ChatTemplateError(ValueError):
    pass


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """The template text of a path or inline template; ChatTemplateError if it cannot be read or parsed."""
    if value is None:
        return None
    try:
        text = Path(value).read_text(encoding="utf-8")
        where = value
    except (OSError, ValueError) as e:  # ValueError: a template with a NUL byte is no path
        if not any(c in value for c in _JINJA_CHARS):
            raise ChatTemplateError(f"chat template {value!r} looks like a file path, but it cannot be read: "
                                    f"{getattr(e, 'strerror', None) or e}") from None
        # backslashreplace first: characters beyond Latin-1 survive the escape decoding unchanged.
        text = codecs.decode(value.encode("latin-1", "backslashreplace"), "unicode_escape")
        where = "the chat template given inline"
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{where} is not a valid Jinja template: {e.message} (line {e.lineno})") from None
    return text
