"""The eval client's URL handling and its errors when no server answers."""

from __future__ import annotations

import socket

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
