"""The eval commands' client of a running gemmguard (or any vLLM OpenAI-compatible) server.

The OpenAI SDK does the HTTP: `/v1/*` through its typed API, gemmguard's own routes through
the same client's plain `get`. Every failure becomes a UsageError naming the URL and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import openai

from gemmguard.errors import UsageError

T = TypeVar("T")


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
    """One server's OpenAI API and gemmguard routes; every failure names the URL and a fix."""

    def __init__(self, base_url: str, timeout_s: float = 600.0) -> None:
        self.base_url = normalize_base_url(base_url)
        self.timeout_s = timeout_s
        # vLLM accepts any key unless started with --api-key; OPENAI_API_KEY passes one on.
        key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.openai = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key,
                                    timeout=timeout_s, max_retries=0)
        self._root = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout_s,
                                   max_retries=0)

    def _call(self, path: str, request: Callable[[], T]) -> T:
        url = self.base_url + path
        try:
            return request()
        except openai.APIStatusError as exc:
            detail = exc.response.text[:500]
            raise UsageError(f"{url} answered HTTP {exc.status_code}: {detail}") from exc
        except openai.APIConnectionError as exc:
            reason = exc.__cause__ or exc
            raise UsageError(
                f"Cannot reach {url}: {reason}. Start the server (gemmguard serve) "
                "or fix the URL."
            ) from exc
        except openai.APIResponseValidationError as exc:
            raise UsageError(f"{url} did not answer as the OpenAI API does ({exc}); is it a "
                             "vLLM server?") from exc

    def get(self, path: str) -> Any:
        """GET a route outside /v1 (gemmguard's own) and decode its JSON answer."""
        return self._call(path, lambda: self._root.get(path, cast_to=object))

    def completion(self, model: str, prompt: str, max_tokens: int,
                   top_logprobs: int) -> Any:
        """A greedy completion with the top log-probabilities at every generated position."""
        return self._call("/v1/completions", lambda: self.openai.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
            logprobs=top_logprobs,
            # vLLM: name tokens by id, since distinct ids can decode to the same text
            # (byte-level pieces all show as U+FFFD) and would collide as map keys.
            extra_body={"return_tokens_as_token_ids": True},
        ))

    def served_models(self) -> list[dict[str, Any]]:
        """The model entries of GET /v1/models (vLLM's extra fields, e.g. `root`, included)."""
        page = self._call("/v1/models", lambda: self.openai.models.list())
        return [model.model_dump() for model in page.data]

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
