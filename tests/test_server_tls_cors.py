"""`freight serve` behind browsers and proxies: HTTPS (--ssl-*), CORS (--allowed-origins, ...) and
--root-path, all as vLLM spells them.

One server runs with all three (and an API key): a self-signed certificate made here with the
openssl CLI, one allowed origin, and the prefix /llm that a path-stripping proxy would serve it
under. The official openai client talks to it over an httpx client that trusts that certificate.
"""

from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
from pathlib import Path
from typing import Optional

import httpx
import openai
import pytest
from server_utils import API_KEY, SERVED_NAME, RemoteServer, chat_model_dir, server  # noqa: F401

ALLOWED = "https://app.example"
ROOT_PATH = "/llm"


def make_self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, valid for a day."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


class TLSServer(RemoteServer):
    """A RemoteServer on https://, polled for health through a client that trusts `cert` (and presents
    `client_cert`, a (certificate, key) pair, where given)."""

    def __init__(self, model: Path, extra_args: list[str], log_path: Path, cert: Path,
                 client_cert: Optional[tuple[Path, Path]] = None, **kw):
        self.ssl_context = self.verify = ssl.create_default_context(cafile=str(cert))
        if client_cert:
            self.ssl_context.load_cert_chain(*map(str, client_cert))
        super().__init__(model, extra_args, log_path, **kw)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def http(self) -> httpx.Client:
        return httpx.Client(verify=self.ssl_context, timeout=60)


@pytest.fixture(scope="module")
def tls_server(stories_dir, tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make the test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = make_self_signed_cert(folder)
    srv = TLSServer(stories_dir, ["--served-model-name", SERVED_NAME, "--ssl-certfile", str(cert),
                                  "--ssl-keyfile", str(key), "--allowed-origins", f'["{ALLOWED}"]',
                                  "--root-path", ROOT_PATH], folder / "server.log", cert=cert, api_key=API_KEY)
    yield srv
    code = srv.stop(signal.SIGTERM)
    assert code == 0, f"server exit code {code} after SIGTERM:\n{srv.log_tail()}"


# -- TLS -------------------------------------------------------------------------------------------

def test_openai_client_over_https(tls_server):
    with tls_server.http() as http:
        client = tls_server.client(http_client=http)
        assert [m.id for m in client.models.list().data] == [SERVED_NAME]
        out = client.completions.create(model=SERVED_NAME, prompt="Once upon a time", max_tokens=4,
                                        temperature=0.0)
        assert out.usage.completion_tokens >= 1 and out.choices[0].finish_reason in ("stop", "length")


def test_untrusted_certificate_and_plain_http_fail(tls_server):
    # The default trust store does not know the self-signed certificate.
    with pytest.raises(openai.APIConnectionError):
        tls_server.client().models.list()
    # Plain HTTP on the TLS port gets no HTTP answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_server.port}/health", timeout=10)


def test_client_certificate_required(stories_dir, tmp_path):
    """--ssl-ca-certs with --ssl-cert-reqs 2 (ssl.CERT_REQUIRED): only a client with a certificate that CA
    signed gets in (the self-signed certificate serves as CA, server and client certificate at once)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make the test certificate")
    cert, key = make_self_signed_cert(tmp_path)
    srv = TLSServer(stories_dir, ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certs",
                                  str(cert), "--ssl-cert-reqs", str(int(ssl.CERT_REQUIRED))],
                    tmp_path / "server.log", cert=cert, client_cert=(cert, key))
    try:
        with srv.http() as http:  # presents the certificate
            assert http.get(srv.url("/v1/models")).status_code == 200
        with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
            httpx.get(srv.url("/v1/models"), verify=ssl.create_default_context(cafile=str(cert)), timeout=10)
    finally:
        assert srv.stop(signal.SIGTERM) == 0, srv.log_tail()


# -- CORS ------------------------------------------------------------------------------------------

def _preflight(http: httpx.Client, url: str, origin: str) -> httpx.Response:
    return http.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "authorization, content-type"})


def test_preflight_from_allowed_origin_needs_no_api_key(tls_server):
    with tls_server.http() as http:
        r = _preflight(http, tls_server.url("/v1/chat/completions"), ALLOWED)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed_headers = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed_headers
    assert "access-control-allow-credentials" not in r.headers  # --allow-credentials not given


def test_preflight_from_other_origin_is_refused(tls_server):
    with tls_server.http() as http:
        r = _preflight(http, tls_server.url("/v1/chat/completions"), "https://evil.example")
        assert r.status_code == 400
        assert "access-control-allow-origin" not in r.headers
        # A plain request from there is answered (CORS is the browser's check) but without the header.
        r = http.get(tls_server.url("/v1/models"), headers={"Origin": "https://evil.example", **tls_server.headers()})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_headers_on_answers_and_errors(tls_server):
    """The allowed page can read both an answer and an error (here: the missing API key's 401)."""
    with tls_server.http() as http:
        ok = http.get(tls_server.url("/v1/models"), headers={"Origin": ALLOWED, **tls_server.headers()})
        denied = http.get(tls_server.url("/v1/models"), headers={"Origin": ALLOWED})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ALLOWED


def test_default_cors_allows_every_origin(server):  # noqa: F811  (the shared server: no CORS flags)
    r = _preflight(httpx.Client(timeout=30), server.url("/v1/completions"), "https://anywhere.example")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


# -- --root-path -------------------------------------------------------------------------------------

def test_root_path_prefixes_the_docs(tls_server):
    """Behind a proxy that serves the API under /llm and strips it: requests come without the prefix
    (they work, see the tests above), and the OpenAPI schema and docs point clients at the prefix."""
    with tls_server.http() as http:
        schema = http.get(tls_server.url("/openapi.json"), headers=tls_server.headers())
        docs = http.get(tls_server.url("/docs"), headers=tls_server.headers())
    assert schema.status_code == 200 and schema.json()["servers"] == [{"url": ROOT_PATH}]
    assert "/v1/completions" in schema.json()["paths"]  # paths stay relative to the prefix
    assert docs.status_code == 200 and f"'{ROOT_PATH}/openapi.json'" in docs.text
