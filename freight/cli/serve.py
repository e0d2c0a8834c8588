"""`freight serve [MODEL]`: the OpenAI-compatible server (flags spelled as vLLM's)."""

from __future__ import annotations

import argparse
import json
import ssl

from freight.cli.engine_args import add_engine_args, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a model over an OpenAI-compatible HTTP API "
                                          "(/v1/completions, /v1/chat/completions, /v1/models, /metrics, ...).")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API (default: $FREIGHT_API_KEY or "
                        "$VLLM_API_KEY; /health, /metrics and /version stay open)")
    s.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use; the first is reported in responses (default: MODEL as given, "
                        "'freight-default' for the bundled model)")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a 'chat_template' in requests (rendered in a sandbox with a time limit); "
                        "by default such requests are refused")
    s.add_argument("--max-request-body-size", default=None, metavar="BYTES",
                   help="refuse larger request bodies with 413 (bytes or e.g. 16MiB; default 16MiB)")
    s.add_argument("--chat-template", default=None, metavar="PATH_OR_TEMPLATE",
                   help="the chat template for chat requests instead of the tokenizer's: a file, or the Jinja "
                        "template itself")
    s.add_argument("--clamp-max-tokens", action="store_true",
                   help="when a request's prompt + max_tokens exceeds max_model_len, lower max_tokens to what "
                        "the context leaves instead of answering 400 (a prompt that alone fills it still gets 400)")
    s.add_argument("--max-waiting-requests", type=positive_int, default=None, metavar="N",
                   help="answer 503 once N requests are waiting to be scheduled (default: no limit)")
    s.add_argument("--log-stats-interval", type=float, default=10.0, metavar="SECONDS",
                   help="log engine throughput and queue stats this often (0: never)")
    s.add_argument("--disable-log-requests", action="store_true", help="no log line per finished request")
    s.add_argument("--disable-uvicorn-access-log", action="store_true")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.add_argument("--graceful-shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long in-flight requests may run on before they are aborted")
    h = p.add_argument_group("CORS, proxy prefix and TLS (as vLLM's)")
    h.add_argument("--allowed-origins", type=json_str_list, default=["*"], metavar="JSON",
                   help='origins browsers may call the API from, e.g. \'["https://app.example"]\' (default ["*"])')
    h.add_argument("--allowed-methods", type=json_str_list, default=["*"], metavar="JSON",
                   help='HTTP methods allowed across origins (default ["*"])')
    h.add_argument("--allowed-headers", type=json_str_list, default=["*"], metavar="JSON",
                   help='request headers allowed across origins (default ["*"])')
    h.add_argument("--allow-credentials", action="store_true", help="allow credentials (cookies) across origins")
    h.add_argument("--root-path", default=None, metavar="PATH",
                   help="the path prefix of a proxy in front of the server that strips it (e.g. /llm): "
                        "the OpenAPI docs carry it")
    h.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="serve HTTPS with this private key")
    h.add_argument("--ssl-certfile", default=None, metavar="FILE", help="serve HTTPS with this certificate")
    h.add_argument("--ssl-ca-certs", default=None, metavar="FILE", help="CA certificates to verify clients with")
    h.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE), metavar="N",
                   help="whether a client certificate is required: 0 no (default), 1 optional, 2 required "
                        "(Python's ssl.CERT_*)")
    t = p.add_argument_group("tool calling and reasoning")
    t.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto": the model decides, --tool-call-parser finds the calls')
    t.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="how the model writes tool calls: hermes (Qwen2.5, Hermes), llama3_json, mistral, pythonic")
    t.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="put the model's <think> text in reasoning_content: deepseek_r1, qwen3")
    add_engine_args(p, model_positional=True)
    p.set_defaults(func=run)


def json_str_list(value: str) -> list[str]:
    """A JSON list of strings (vLLM's --allowed-origins etc.)."""
    try:
        items = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise argparse.ArgumentTypeError(f'expected a JSON list of strings such as \'["*"]\', got {value!r}')
    return items


def run(args: argparse.Namespace) -> int:
    from freight.entrypoints.openai.api_server import run_server

    if not (args.model_tag or args.model):
        try:
            from freight.model_dir import default_model_path  # noqa: F401  the bundled model
        except ImportError:
            raise ValueError("a model is needed: `freight serve MODEL` (a Hugging Face model directory or hub "
                             "id); this installation has no bundled default model") from None
    return run_server(args)
