"""What ``adapt serve`` offers before anything is loaded: where it binds, where its token comes from."""
from __future__ import annotations

TOKEN_ENV = "ADAPTERHUB_SERVE_TOKEN"  # the bearer token when --token is not given
DEFAULT_HOST = "127.0.0.1"            # loopback unless asked otherwise

__all__ = ["TOKEN_ENV", "DEFAULT_HOST"]
