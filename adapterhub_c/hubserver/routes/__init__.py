"""The local Hub's routes, one ``APIRouter`` per part of the Hub API, in the order they are matched."""
from __future__ import annotations

from adapterhub_c.hubserver.routes import account, downloads, models, repos, uploads

ROUTERS = (account.router, repos.router, models.router, uploads.router, downloads.router)

__all__ = ["ROUTERS"]
