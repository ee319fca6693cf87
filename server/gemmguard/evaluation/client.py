"""A small JSON client for a running gemmguard (or any vLLM OpenAI-compatible) server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from gemmguard.errors import UsageError


def normalize_base_url(url: str) -> str:
    """`url` without a trailing slash or /v1, so paths like /v1/models can be appended."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise UsageError(
            f"Base URL '{url}' has no scheme; write it as http://HOST:PORT "
            "(e.g. http://127.0.0.1:8000)."
        )
    return url


class ServerClient:
    """GET and POST JSON against one server; every failure names the URL and what to check."""

    def __init__(self, base_url: str, timeout_s: float = 600.0) -> None:
        self.base_url = normalize_base_url(base_url)
        self.timeout_s = timeout_s

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise UsageError(f"{url} answered HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UsageError(
                f"Cannot reach {url}: {reason}. Start the server (gemmguard serve) "
                "or fix the URL."
            ) from exc
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{url} did not answer with JSON ({exc}); is it a vLLM server?"
            ) from exc

    def get(self, path: str) -> Any:
        """GET `path` and decode the JSON answer."""
        return self._request(path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST `body` as JSON to `path` and decode the JSON answer."""
        return self._request(path, body)

    def served_models(self) -> list[dict[str, Any]]:
        """The model entries of GET /v1/models."""
        body = self.get("/v1/models")
        return [m for m in body.get("data", []) if isinstance(m, dict)]

    def build(self) -> dict[str, Any] | None:
        """gemmguard's build report of the server, or None when it is not a gemmguard server."""
        try:
            body = self.get("/gemmguard/v1/build")
        except UsageError:
            return None
        api_server = body.get("api_server") if isinstance(body, dict) else None
        return api_server if isinstance(api_server, dict) else None

    def kernels(self) -> dict[str, list[str]] | None:
        """Scheme -> the kernels its layers run, from gemmguard's kernel route; None elsewhere."""
        try:
            body = self.get("/gemmguard/v1/kernels")
            rows = [row for rank in body["ranks"] for row in rank["layers"]]
            found: dict[str, set[str]] = {}
            for row in rows:
                found.setdefault(str(row["scheme"]), set()).add(str(row["kernel"]))
        except (UsageError, KeyError, TypeError):
            return None
        return {scheme: sorted(names) for scheme, names in sorted(found.items())}

    def pick_model(self, wanted: str | None, expected: str | None = None) -> str:
        """The served model name to send: `wanted`, else `expected` if served, else the only one."""
        models = self.served_models()
        ids = [str(m.get("id")) for m in models]
        if wanted is not None:
            if wanted not in ids:
                raise UsageError(
                    f"Model '{wanted}' is not served at {self.base_url} (it serves: "
                    f"{', '.join(ids) or 'nothing'}). Pass one of those with --model."
                )
            return wanted
        if expected is not None:
            for model in models:
                if expected in (model.get("id"), model.get("root")):
                    return str(model["id"])
            raise UsageError(
                f"The config is for '{expected}', but {self.base_url} serves "
                f"{', '.join(ids) or 'nothing'}. Point --base-url at a server of that model, "
                "or pass --model NAME to evaluate the served model against this config anyway."
            )
        if len(ids) != 1:
            raise UsageError(
                f"{self.base_url} serves {len(ids)} models ({', '.join(ids) or 'none'}); "
                "pass --model NAME to choose one."
            )
        return ids[0]
