"""Upload and camera capture: the front doors for clinics without a PACS and for bedside photographs.

Both pages only prepare what the browser sends to ``POST /api/studies`` (node.web.api): files or a
camera picture, the task a photograph is for and the patient it shows, typed or picked from the
DICOM worklist. The pages' scripts (static/upload.js, static/capture.js) then follow the study through
``GET /api/studies/{uid}`` and show its result, so what enters here takes the same path as a C-STORE.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from node.config import Settings
from node.ingest.photo import KINDS
from node.web.auth import Principal, require
from node.web.render import page

router = APIRouter()
Operator = Annotated[Principal, Depends(require("operator"))]


def _form_context(settings: Settings) -> dict[str, Any]:
    """What both pages' patient form needs: the photograph tasks and whether a worklist is there to
    pick from (without one the operator types the patient's details)."""
    return {
        "kinds": [{"key": key, "label": kind.label, "guide": kind.guide} for key, kind in KINDS.items()],
        "worklist": bool(settings.worklist.host),
    }


@router.get("/upload", response_class=HTMLResponse)
def upload_page(request: Request, principal: Operator) -> HTMLResponse:
    return page(request, "upload.html", principal, **_form_context(request.app.state.settings))


@router.get("/capture", response_class=HTMLResponse)
def capture_page(request: Request, principal: Operator) -> HTMLResponse:
    settings: Settings = request.app.state.settings
    guides = {"bezier": settings.capture.conjunctiva_frame, "circle": settings.capture.skin_circle_radius}
    return page(request, "capture.html", principal, guides=guides, **_form_context(settings))
