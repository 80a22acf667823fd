"""One round of requests against an in-process server, for ``adapt demo`` (and a smoke check).

``demo_round(reg, target, adapters)`` starts the server on a random loopback port, sends
one greedy request per adapter with the ``openai`` client (stdlib HTTP when that package
is not installed), then one more per adapter now that it is resident, and returns a row
per adapter: the answer, the first (from the registry) and the resident switch times as
the server measured them, and the client-side latency.
"""
from __future__ import annotations

import json
import time
import urllib.request
from typing import Sequence

from adapterhub_c.registry.store import Registry
from adapterhub_c.serve.server import BackgroundServer, ServeOptions

DEMO_PROMPT = "Hello"


def _client(base_url: str, token: str):
    try:
        from openai import OpenAI
    except ImportError:
        return None
    return OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=120)


def _complete(client, base_url: str, token: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if client is not None:
        return client.completions.create(**body).model_dump()
    req = urllib.request.Request(base_url + "/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310 - loopback
        return json.loads(r.read())


def demo_round(reg: Registry, target: str, adapters: Sequence[str], prompts: dict[str, str] | str = DEMO_PROMPT,
               max_tokens: int = 24, warm: bool = True, device: str | None = "cpu") -> list[dict]:
    """Rows ``{model, kind, answer, finish_reason, first_switch_ms, resident_switch_ms, latency_ms,
    first_cache, resident_cache}`` (the caches: the server's "miss" / "hit" for each request).

    ``prompts``: one prompt for all, or {adapter name: prompt}. Names may be ``adapter+prompt``.
    Switch times are the server's (``x_adapterhub.switch_ms``): the first request loads the
    adapter from the registry (packs are decoded), the second finds it resident.
    """
    options = ServeOptions(adapters=[a for a in adapters if "+" not in a] + sorted(
        {part for a in adapters if "+" in a for part in a.split("+")}), preload=False, token="",
        device=device)
    rows = []
    with BackgroundServer(reg, target, options) as srv:
        client = _client(srv.base_url, "unused")
        kinds = {m["id"]: m["kind"] for m in srv.server.cache.listing()}
        for name in adapters:
            prompt = prompts if isinstance(prompts, str) else prompts.get(name, DEMO_PROMPT)
            t0 = time.perf_counter()
            out = _complete(client, srv.base_url, "unused", name, prompt, max_tokens)
            latency = time.perf_counter() - t0
            choice = out["choices"][0]
            row = {"model": name, "kind": "+".join(kinds.get(p, "?") for p in name.split("+")),
                   "answer": choice["text"], "finish_reason": choice["finish_reason"],
                   "first_switch_ms": out["x_adapterhub"]["switch_ms"], "resident_switch_ms": None,
                   "latency_ms": round(latency * 1000, 1), "first_cache": out["x_adapterhub"]["cache"],
                   "resident_cache": None}
            rows.append(row)
        if warm:
            for row in rows:
                prompt = prompts if isinstance(prompts, str) else prompts.get(row["model"], DEMO_PROMPT)
                out = _complete(client, srv.base_url, "unused", row["model"], prompt, 1)
                row["resident_switch_ms"] = out["x_adapterhub"]["switch_ms"]
                row["resident_cache"] = out["x_adapterhub"]["cache"]
    return rows


__all__ = ["demo_round"]
