"""--chat-template (vLLM's flag) and LLM.chat(chat_template=...): a file or the template itself.

- a file is read, an inline template has its escapes decoded, a missing path or a broken
  template is a clear error (for the server: at start-up, before the engine loads);
- offline, LLM.chat renders with the given template (a file path works);
- the server's chat endpoint and /tokenize use the flag's template instead of the
  tokenizer's, and a template in a request is still refused without
  --trust-request-chat-template.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from server_utils import REPO_ROOT, clean_server

BUNDLED = REPO_ROOT / "freight" / "default_model"
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
RENDERED = "[system] Be brief.\n[user] What is 2+2?\n[assistant] "


def test_load_chat_template(tmp_path):
    from freight.entrypoints.chat_template import ChatTemplateError, load_chat_template

    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(None) is None
    # Shells pass "\n" literally; non-ASCII text survives the unescaping.
    assert load_chat_template(TEMPLATE.replace("\n", "\\n") + "é✓") == TEMPLATE + "é✓"
    with pytest.raises(ChatTemplateError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatTemplateError, match="not a valid Jinja template"):
        load_chat_template("{% for m in messages %}{{ m }}")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ messages[0]['content'] }")
    with pytest.raises(ChatTemplateError, match="broken.jinja is not a valid Jinja template"):
        load_chat_template(str(broken))


def test_llm_chat_with_template_file(stories_dir, tmp_path, make_llm):
    from freight import SamplingParams

    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    llm = make_llm(stories_dir)  # stories260k's tokenizer has no chat template of its own
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat(MESSAGES, SamplingParams(max_tokens=2), use_tqdm=False)
    out = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False, chat_template=str(path))[0]
    assert out.prompt == RENDERED
    assert list(out.prompt_token_ids) == llm.get_tokenizer()(RENDERED, add_special_tokens=False).input_ids
    inline = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False, chat_template=TEMPLATE)
    assert inline[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_server_refuses_a_broken_template_at_start():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for value, message in (("{% for m in messages %}", "not a valid Jinja template"),
                           ("no/such/template.jinja", "looks like a file path")):
        proc = subprocess.run([sys.executable, "-m", "freight", "serve", str(BUNDLED), "--port", "1",
                               "--chat-template", value], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode != 0
        assert message in proc.stderr + proc.stdout, proc.stderr[-2000:]


def test_server_uses_the_flags_template(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED)
    assert tok.chat_template and "[assistant]" not in tok.chat_template
    expected = tok(RENDERED, add_special_tokens=False).input_ids
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    with clean_server(BUNDLED, ["--chat-template", str(path)], tmp_path / "server.log") as srv:
        r = httpx.post(srv.url("/tokenize"), json={"messages": MESSAGES}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == expected
        r = httpx.post(srv.url("/v1/chat/completions"),
                       json={"messages": MESSAGES, "max_tokens": 3, "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(expected)
        r = httpx.post(srv.url("/v1/chat/completions"),
                       json={"messages": MESSAGES, "max_tokens": 3, "chat_template": TEMPLATE}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_not_allowed"
