"""The node's effective configuration, for admins: what the node runs with (the file overlaid with
``AINODE_*`` environment variables), with the database password masked."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import tomli_w
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.engine import make_url

from node import audit
from node.accounts import Principal
from node.config import Settings
from node.web.auth import require
from node.web.render import page

router = APIRouter()


def effective(settings: Settings) -> str:
    """The settings as TOML, as a config file would state them; no secret is shown."""
    data: dict[str, Any] = settings.model_dump(mode="json", exclude_none=True)
    url = data["node"].get("database_url")
    if url:
        data["node"]["database_url"] = make_url(url).render_as_string(hide_password=True)
    distributed = data["jobs"]["distributed"]
    if distributed.get("secret"):
        distributed["secret"] = "***"
    broker = urlsplit(distributed["broker_url"])
    if broker.password:
        netloc = f"{broker.username or ''}:***@{broker.hostname or ''}" + (
            f":{broker.port}" if broker.port else ""
        )
        distributed["broker_url"] = urlunsplit(broker._replace(netloc=netloc))
    return tomli_w.dumps(data)


@router.get("/admin/configuration", response_class=HTMLResponse)
def configuration_page(
    request: Request, principal: Annotated[Principal, Depends(require("admin"))]
) -> HTMLResponse:
    settings: Settings = request.app.state.settings
    audit.append(request.app.state.db, "configuration.viewed", actor=principal.actor)
    return page(request, "configuration.html", principal, configuration=effective(settings))
