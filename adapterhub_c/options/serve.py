"""What ``adapt serve`` offers before anything is loaded: where it binds, where its token comes from."""
from __future__ import annotations

TOKEN_ENV = "ADAPTERHUB_SERVE_TOKEN"  # the bearer token when --token is not given
DEFAULT_HOST = "127.0.0.1"            # loopback unless asked otherwise
# A generation body is a prompt (or a conversation) and a few parameters: a whole 128K-token
# context of text is ~0.5 MB of JSON, so 8 MiB leaves room and refuses the 300 MB ones.
DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_BODY_TIMEOUT_S = 60.0         # a body not complete by then: 408, connection closed

__all__ = ["TOKEN_ENV", "DEFAULT_HOST", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_BODY_TIMEOUT_S"]
