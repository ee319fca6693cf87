"""The eval client's URL handling and its errors when no server answers."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from gemmguard.errors import UsageError
from gemmguard.evaluation.client import ServerClient, normalize_base_url


@pytest.mark.parametrize(
    "given", ["http://10.0.0.5:8000", "http://10.0.0.5:8000/", "http://10.0.0.5:8000/v1",
              " http://10.0.0.5:8000/v1/ "],
)
def test_base_url_is_normalised(given: str) -> None:
    assert normalize_base_url(given) == "http://10.0.0.5:8000"


def test_base_url_without_scheme_is_rejected() -> None:
    with pytest.raises(UsageError, match=r"Base URL '10.0.0.5:8000' has no scheme"):
        normalize_base_url("10.0.0.5:8000")


def test_unreachable_server_is_named_with_a_fix() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now.
    client = ServerClient(f"http://127.0.0.1:{port}", timeout_s=5)
    with pytest.raises(UsageError, match=rf"Cannot reach http://127.0.0.1:{port}/v1/models: .*"
                                         r"Start the server \(gemmguard serve\)"):
        client.served_models()
    assert client.build() is None


class _Handler(http.server.BaseHTTPRequestHandler):
    """A small OpenAI-compatible server: the answers vLLM gives, over real HTTP."""

    requests: list[tuple[str, str, dict[str, Any] | None]] = []

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        self.requests.append(("GET", self.path, None))
        if self.path == "/v1/models":
            self._answer(200, {"object": "list", "data": [
                {"id": "served", "object": "model", "created": 0, "owned_by": "vllm",
                 "root": "/models/org-model"}]})
        elif self.path == "/gemmguard/v1/build":
            self._answer(200, {"api_server": {"version": "0.1.0", "platform": "cpu"}})
        else:
            self._answer(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(("POST", self.path, body))
        self._answer(200, {"id": "c", "object": "text_completion", "created": 0,
                           "model": body["model"], "choices": [{
                               "index": 0, "text": "ab", "finish_reason": "length",
                               "logprobs": {"tokens": ["token_id:1", "token_id:2"],
                                            "token_logprobs": [-0.1, -0.2], "text_offset": [0, 1],
                                            "top_logprobs": [{"token_id:1": -0.1},
                                                             {"token_id:2": -0.2}]}}]})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_models_gemmguard_routes_and_completions_over_http(server: str) -> None:
    client = ServerClient(server + "/v1/", timeout_s=10)
    assert client.pick_model(None, expected="/models/org-model") == "served"
    assert client.build() == {"version": "0.1.0", "platform": "cpu"}
    assert client.kernels() is None  # 404: not a gemmguard kernel route here
    completion = client.completion("served", "Hi", max_tokens=2, top_logprobs=1)
    assert completion.choices[0].logprobs.tokens == ["token_id:1", "token_id:2"]
    method, path, body = _Handler.requests[-1]
    assert (method, path) == ("POST", "/v1/completions")
    assert body is not None and body["return_tokens_as_token_ids"] is True
    assert (body["temperature"], body["logprobs"], body["max_tokens"]) == (0, 1, 2)


def test_an_http_error_names_the_url_and_the_status(server: str) -> None:
    client = ServerClient(server, timeout_s=10)
    with pytest.raises(UsageError, match=rf"{server}/gemmguard/v1/nope answered HTTP 404: .*"
                                         "no route"):
        client.get("/gemmguard/v1/nope")


def test_kernel_swap_reads_the_sdks_logprobs(server: str) -> None:
    from gemmguard.evaluation.kernel_swap import generate

    steps = generate(ServerClient(server, timeout_s=10), "served", "Hi", 2, 1)
    assert [(s.token, dict(s.top_logprobs)) for s in steps] == [
        ("token_id:1", {"token_id:1": -0.1}), ("token_id:2", {"token_id:2": -0.2})]
