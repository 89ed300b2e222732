"""Server-rendered pages: the templates, and what every page's layout needs besides its own content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from node.accounts import Principal, role_at_least

TEMPLATES = Path(__file__).resolve().parent / "templates"
templates = Jinja2Templates(directory=TEMPLATES)  # autoescapes .html: names and reports are data


def error_line(error: str) -> str:
    """What users see of a job's or send's error: its first line (the exception and its message),
    never the stack trace kept for whoever debugs the node."""
    return error.strip().split("\n", 1)[0]


templates.env.filters["error_line"] = error_line

NAV = (
    ("/", "Overview"),
    ("/studies", "Studies"),
    ("/models", "Models"),
    ("/routes", "Routes"),
    ("/destinations", "Destinations"),
    ("/audit", "Audit"),
)
ADMIN_NAV = (
    ("/admin/users", "Users"),
    ("/admin/tokens", "Tokens"),
    ("/admin/configuration", "Configuration"),
)


def _nav(path: str, principal: Principal | None) -> list[dict[str, Any]]:
    if principal is None:
        return []
    items = [*NAV, *(ADMIN_NAV if role_at_least(principal.role, "admin") else ())]
    return [
        {
            "href": href,
            "label": label,
            "current": path == href or (href != "/" and path.startswith(href + "/")),
        }
        for href, label in items
    ]


def page(
    request: Request, template: str, principal: Principal | None, *, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """``template`` rendered with ``context``, the signed-in principal, the session's CSRF token for
    forms, the navigation and the node's AE title. ``principal`` is None only on the login and error
    pages."""
    return templates.TemplateResponse(
        request,
        template,
        {
            **context,
            "principal": principal,
            "csrf_token": getattr(request.state, "csrf_token", ""),
            "nav": _nav(request.url.path, principal),
            "ae_title": request.app.state.settings.node.ae_title,
        },
        status_code=status_code,
    )
