"""``adapt serve``: one base or variant, many adapters chosen per request, behind the OpenAI HTTP shape.

Modules: ``layers`` (our multi-adapter linear layer), ``adapters`` (names, resident LRU),
``engine`` (batching and decoding), ``metrics`` (Prometheus text), ``errors`` (OpenAI
error shape), ``app`` (FastAPI routes), ``server`` (loading, uvicorn), ``demo`` (one
round of requests for ``adapt demo``).
"""
from adapterhub_c.serve.demo import demo_round
from adapterhub_c.serve.server import AdapterServer, BackgroundServer, ServeOptions, serve

__all__ = ["AdapterServer", "BackgroundServer", "ServeOptions", "serve", "demo_round"]
