"""The FastAPI app of ``adapt ui``: read-only pages over one registry, each with a JSON twin.

A page is a function ``(registry, request) -> (template, data)``; the same function answers
``/x`` (HTML, or JSON with ``?format=json``) and ``/api/x`` (JSON). Data comes from
``registry.pages`` / ``registry.views``; templates only lay it out.
"""
from __future__ import annotations

import hmac
import json
import math
from typing import Any, Callable
from urllib.parse import urlencode

from adapterhub_c.errors import NotFoundError, UsageError
from adapterhub_c.registry import pages, views
from adapterhub_c.registry.store import Registry
from adapterhub_c.ui import svg
from adapterhub_c.units import human_bytes

COOKIE = "adapt_ui_token"
PICTURE_TYPES = {".png": "image/png", ".svg": "image/svg+xml"}
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")



def num(value: Any) -> str:
    """A figure as ``adapt show`` prints it (4 significant digits)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _templates():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("adapterhub_c.ui", "templates"),
                      autoescape=select_autoescape(("html", "svg"), default=True), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters.update(bytes=human_bytes, num=num, href=svg.object_href,
                       tojson_pretty=lambda v: json.dumps(v, indent=2, sort_keys=True, default=str))
    env.globals.update(lineage_svg=svg.lineage_svg, scatter_svg=svg.scatter_svg, line_svg=svg.line_svg)
    return env


# ---- pages -------------------------------------------------------------------------------------


def _int(request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name} must be an integer (got {raw!r})") from None


def _opt(request, name: str) -> str | None:
    value = request.query_params.get(name)
    return value.strip() or None if value is not None else None


def home_page(reg: Registry, request) -> tuple[str, dict]:
    """Counts, disk use, latest runs."""
    return "home.html", pages.summary(reg, runs=_int(request, "runs", 15))


def bases_page(reg: Registry, request) -> tuple[str, dict]:
    """Every base, each a link to its model tree."""
    return "bases.html", {"bases": views.list_objects(reg, "bases")}


def tree_page(reg: Registry, request) -> tuple[str, dict]:
    """Base → variants → adapters → packs / merges / compositions / prompts."""
    from adapterhub_c.workflows.variants import variant_summary

    data = pages.model_tree(reg, request.path_params["base"], page=_int(request, "page", 1),
                            per_page=_int(request, "per_page", pages.PER_PAGE), describe_variant=variant_summary)
    return "tree.html", data


def object_page(reg: Registry, request) -> tuple[str, dict]:
    """One base, variant or artefact: row, files, lineage, evaluations, run, pictures."""
    ref = request.path_params["ref"]
    data = pages.detail(reg, ref)
    data["lineage"] = pages.lineage_graph(reg, ref)
    if data["object"]["type"] == "variant":
        from adapterhub_c.workflows.variants import show_variant

        data["variant"] = show_variant(reg, data["object"]["id"])
    return "object.html", data


def compare_page(reg: Registry, request) -> tuple[str, dict]:
    """Chosen artefacts (``a=…`` repeated or one per line of ``names``) or all adapters of a task / variant."""
    refs = [r for r in request.query_params.getlist("a") if r.strip()]
    refs += [line.strip() for line in (request.query_params.get("names") or "").replace(",", "\n").splitlines()
             if line.strip()]
    task, variant = _opt(request, "task"), _opt(request, "variant")
    data = pages.compare(reg, refs, task=task, variant=variant) if refs or task or variant else \
        {"rows": [], "references": [], "columns": [], "quality_metric": None, "scatter": {"points": []}}
    data.update(chosen=refs, task=task, variant=variant, variants=[v["name"] for v in views.list_objects(reg, "variants")])
    return "compare.html", data


def runs_page(reg: Registry, request) -> tuple[str, dict]:
    """Runs filtered by command and status, newest first."""
    return "runs.html", pages.list_runs(reg, command=_opt(request, "command"), status=_opt(request, "status"),
                                        page=_int(request, "page", 1),
                                        per_page=_int(request, "per_page", pages.PER_PAGE))


def search_page(reg: Registry, request) -> tuple[str, dict]:
    """Bases, variants and artefacts by name, kind, base, Hub repo or tag."""
    data = pages.search(reg, request.query_params.get("q") or "", kind=_opt(request, "kind"),
                        base=_opt(request, "base"), page=_int(request, "page", 1),
                        per_page=_int(request, "per_page", pages.PER_PAGE))
    data["kinds"] = ["base", "variant", *pages.ARTIFACT_KINDS]
    return "search.html", data


PAGES: list[tuple[str, str, Callable]] = [
    ("/", "/api/summary", home_page),
    ("/tree", "/api/tree", bases_page),
    ("/tree/{base:path}", "/api/tree/{base:path}", tree_page),
    ("/object/{ref:path}", "/api/object/{ref:path}", object_page),
    ("/compare", "/api/compare", compare_page),
    ("/runs", "/api/runs", runs_page),
    ("/search", "/api/search", search_page),
]


# ---- the app ---------------------------------------------------------------------------------------


def create_app(reg: Registry, token: str | None = None):
    """The ASGI app over ``reg``; with ``token``, every request must carry it (header, cookie or once ``?token=``)."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    env = _templates()
    app = FastAPI(title="adapt ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.reg, app.state.env = reg, env
    for html_path, api_path, fn in PAGES:
        app.add_route(html_path, _endpoint(fn, env, json_only=False), methods=["GET"], name=fn.__name__)
        app.add_route(api_path, _endpoint(fn, env, json_only=True), methods=["GET"], name=f"api_{fn.__name__}")
    app.add_route("/file", _file_endpoint(reg), methods=["GET"])
    app.mount("/static", StaticFiles(packages=[("adapterhub_c.ui", "static")]), name="static")

    async def not_found(request, exc: HTTPException):
        if exc.status_code == 404:
            return _error(env, request, 404, f"no page at {request.url.path}", [])
        return _error(env, request, exc.status_code, str(exc.detail), [])

    app.add_exception_handler(HTTPException, not_found)
    app.middleware("http")(_guard(token, env))
    return app


def _wants_json(request, json_only: bool) -> bool:
    return json_only or request.query_params.get("format") == "json"


def _endpoint(fn: Callable, env, json_only: bool):
    from starlette.concurrency import run_in_threadpool

    async def endpoint(request):
        reg = request.app.state.reg
        try:
            template, data = await run_in_threadpool(fn, reg, request)
        except NotFoundError as e:
            closest = await run_in_threadpool(pages.closest_names, reg, e.name)
            return _error(env, request, 404, str(e), closest, json_only)
        except UsageError as e:
            return _error(env, request, 400, str(e), [], json_only)
        if _wants_json(request, json_only):
            return _json(data)
        return _html(env, template, request, data)

    endpoint.__name__ = fn.__name__
    return endpoint


def _json(data: Any, status: int = 200):
    from starlette.responses import Response

    body = json.dumps(_jsonable(data), default=str, ensure_ascii=False)
    return Response(body, status_code=status, media_type="application/json")


def _html(env, template: str, request, data: dict, status: int = 200):
    from starlette.responses import HTMLResponse

    def url(**params):
        query = {k: v for k, v in {**dict(request.query_params), **params}.items() if v not in (None, "")}
        query.pop("token", None)
        return f"{request.url.path}?{urlencode(query, doseq=True)}"

    page = env.get_template(template).render(data=data, path=request.url.path, url=url, json_url=url(format="json"))
    return HTMLResponse(page, status_code=status, headers={"Content-Security-Policy": CSP})


def _error(env, request, status: int, message: str, closest: list[str], json_only: bool = False):
    if _wants_json(request, json_only) or request.url.path.startswith("/api/"):
        return _json({"error": message, "status": status, "closest": closest}, status)
    return _html(env, "error.html", request, {"status": status, "message": message, "closest": closest}, status)


def _file_endpoint(reg: Registry):
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse

    async def file(request):
        ref, path = request.query_params.get("ref") or "", request.query_params.get("path") or ""
        suffix = path[path.rfind("."):].lower() if "." in path else ""
        env = request.app.state.env
        if suffix not in PICTURE_TYPES:
            return _error(env, request, 404, f"no picture {path!r}", [])
        try:
            row = await run_in_threadpool(views.show_object, reg, ref)
        except NotFoundError as e:
            return _error(env, request, 404, str(e), await run_in_threadpool(pages.closest_names, reg, e.name))
        digest = (row.get("files") or {}).get(path)
        if digest is None:
            return _error(env, request, 404, f"{row['name']!r} has no file {path!r}", sorted(row.get("files") or {}))
        return FileResponse(reg.blobs.path_for(digest), media_type=PICTURE_TYPES[suffix],
                            headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})

    return file


def _guard(token: str | None, env):
    """Middleware: with a token, a request passes with ``Authorization: Bearer``, the cookie, or
    ``?token=`` (answered by a redirect that sets the cookie and drops the token from the URL)."""
    from starlette.responses import RedirectResponse

    async def guard(request, call_next):
        if token is None:
            return _secured(await call_next(request))
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given.encode(), token.encode()):
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            target = request.url.path + (f"?{query}" if query else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return _secured(response)
        header = request.headers.get("authorization", "")
        offered = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
        if offered and hmac.compare_digest(offered.encode(), token.encode()):
            return _secured(await call_next(request))
        return _secured(_error(env, request, 401, "this page needs the token that adapt ui was started with", []))

    return guard


def _secured(response):
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response
