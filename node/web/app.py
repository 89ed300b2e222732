"""The HTTP app: the JSON API, the dashboard's pages, and the static files they use.

Everything a browser loads comes from the node (hospital networks are closed); the Content Security
Policy says so to the browser too, so a page can load no script, style or font from anywhere else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from node.config import Settings
from node.db import Database
from node.dicom.limits import ListenerLoad
from node.ingest.accept import Ingest
from node.spool import Spool
from node.web import api, auth, internal, worklist
from node.web.pages import (
    audit,
    capture,
    configuration,
    destinations,
    models,
    overview,
    routes,
    studies,
    workers,
)
from node.web.render import page

STATIC = Path(__file__).resolve().parent / "static"
# Scripts only from the node's files; style attributes are allowed (they run no code).
_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


def create_app(
    db: Database,
    spool: Spool,
    settings: Settings,
    dicom_listening: Callable[[], bool] = lambda: True,
    dicom_load: Callable[[], ListenerLoad | None] = lambda: None,
    complete_study: Callable[[str, str], None] | None = None,
    ingest: Ingest | None = None,
    job_ended: Callable[[], None] | None = None,
) -> FastAPI:
    """The app. ``dicom_listening`` tells /healthz whether the DICOM listener is up, ``dicom_load`` how
    many connections it holds against its limit (None: not known), ``complete_study`` declares a study
    complete (node.ingest.index.Indexer.complete_study; None: no node runs here to tell), ``ingest``
    takes uploads (POST /api/studies; None: no node runs here to take them), ``job_ended`` wakes the
    node's dispatcher and sender after a distributed worker's outcome (node.service.Node.job_ended;
    None: their next tick does)."""
    # No /docs: the interactive API pages would load their scripts from a CDN.
    app = FastAPI(title="AI node", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.db, app.state.spool, app.state.settings = db, spool, settings
    app.state.dicom_listening, app.state.dicom_load = dicom_listening, dicom_load
    app.state.complete_study, app.state.ingest = complete_study, ingest
    app.state.job_ended = job_ended
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for module in (
        api,
        auth,
        worklist,
        overview,
        studies,
        models,
        routes,
        destinations,
        audit,
        configuration,
        capture,
        workers,
        internal,
    ):
        app.include_router(module.router)

    @app.exception_handler(auth.LoginRequired)
    async def login_first(request: Request, exc: auth.LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.next_path, safe='/')}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        """JSON for the API, a page for people."""
        if auth.is_api(request) or request.url.path == "/healthz":
            return await http_exception_handler(request, exc)
        principal = getattr(request.state, "principal", None)
        response = page(
            request,
            "error.html",
            principal,
            status_code=exc.status_code,
            status=exc.status_code,
            detail=exc.detail,
        )
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", _POLICY)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"  # patient data and new tokens stay off disks
        return response

    return app
