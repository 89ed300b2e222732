"""Who may do what: sessions and API tokens, roles, CSRF, and the login, logout and admin pages.

Every route but /healthz, /login and /static depends on :func:`require`. A session rides in an
HTTP-only, SameSite=Strict cookie; state-changing requests made with it must also carry the session's
CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``), derived from the cookie by HMAC so
nothing more is stored and no other page can learn it. API tokens come as ``Authorization: Bearer``
headers, which a browser never adds on its own, so they need no CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from node import accounts
from node.accounts import AccountError, Principal, Role, role_at_least
from node.config import Settings
from node.db import Database
from node.web.render import page

__all__ = ["LoginRequired", "Principal", "Role", "csrf_token", "is_api", "require", "router"]

SESSION_COOKIE = "ainode_session"
LOGIN_COOKIE = "ainode_login"  # the login form's own CSRF token (double submit): no session yet
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})

router = APIRouter()


class LoginRequired(Exception):
    """A page asked for without a session: the app answers with a redirect to the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def is_api(request: Request) -> bool:
    """JSON routes answer 401/403 in JSON; pages redirect to the login page or show a page."""
    path = request.url.path
    return path.startswith("/api/") or path == "/metrics"


def csrf_token(session_token: str) -> str:
    return hmac.new(session_token.encode(), b"csrf", hashlib.sha256).hexdigest()


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _principal(request: Request) -> Principal | None:
    db: Database = request.app.state.db
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return accounts.token_principal(db, credentials.strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    principal = accounts.session_principal(db, cookie)
    if principal is not None:
        request.state.csrf_token = csrf_token(cookie)
    return principal


async def _sent_csrf(request: Request) -> str:
    header = request.headers.get("x-csrf-token")
    if header:
        return header
    if request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        value = (await request.form()).get("csrf_token")
        return value if isinstance(value, str) else ""
    return ""


def require(role: Role) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency: the request's Principal if it has ``role`` or a higher one. Without credentials:
    401 for JSON routes, a redirect to the login page for pages; a lower role: 403."""

    async def dependency(request: Request) -> Principal:
        principal = await run_in_threadpool(_principal, request)
        if principal is None:
            if is_api(request):
                raise HTTPException(
                    401, "log in or send an API token", headers={"WWW-Authenticate": "Bearer"}
                )
            raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        request.state.principal = principal  # an error page shows who is signed in
        if principal.via == "session" and request.method in _UNSAFE:
            sent = await _sent_csrf(request)
            if not hmac.compare_digest(sent.encode(), request.state.csrf_token.encode()):
                raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        if not role_at_least(principal.role, role):
            raise HTTPException(403, f"this needs the {role} role; {principal.name} is {principal.role}")
        return principal

    return dependency


def _safe_next(target: str) -> str:
    """Only a path on this node: never an open redirect to another site."""
    return target if target.startswith("/") and not target.startswith(("//", "/\\")) else "/"


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _login_page(request: Request, next_path: str, error: str = "", status: int = 200) -> HTMLResponse:
    form_token = secrets.token_urlsafe(32)
    response = page(
        request,
        "login.html",
        None,
        status_code=status,
        next_path=_safe_next(next_path),
        login_token=form_token,
        error=error,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        form_token,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=_settings(request).web.secure_cookies,
    )
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return _login_page(request, next)


@router.post("/login")
def login(
    request: Request,
    name: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    login_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(login_token.encode(), expected.encode()):
        return _login_page(request, next, "The login form expired: please try again.", 403)
    web = _settings(request).web
    opened = accounts.log_in(
        request.app.state.db,
        name,
        password,
        web,
        client_address(request),
        replaces=request.cookies.get(SESSION_COOKIE),
    )
    if opened is None:
        error = (
            f"Wrong name or password. After {web.lockout_after} failures in a row an account is "
            "locked for a while; a disabled account cannot log in."
        )
        return _login_page(request, next, error, 401)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        opened.token,
        expires=opened.expires_at,
        httponly=True,
        samesite="strict",
        secure=web.secure_cookies,
    )
    response.delete_cookie(LOGIN_COOKIE)
    return response


@router.post("/logout")
def logout(request: Request, principal: Annotated[Principal, Depends(require("viewer"))]) -> Response:
    cookie = request.cookies.get(SESSION_COOKIE)
    if principal.via == "session" and cookie:
        accounts.log_out(request.app.state.db, cookie, actor=principal.actor, client=client_address(request))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict")
    return response


def _back(path: str, message: str = "", error: str = "") -> RedirectResponse:
    """Post/redirect/get: the admin page again, with what happened."""
    query = f"?done={quote(message)}" if message else f"?error={quote(error)}" if error else ""
    return RedirectResponse(path + query, status_code=303)


Admin = Annotated[Principal, Depends(require("admin"))]


@router.get("/admin/users", response_class=HTMLResponse)
def admin_users(request: Request, principal: Admin, done: str = "", error: str = "") -> HTMLResponse:
    return page(
        request,
        "admin_users.html",
        principal,
        users=accounts.users(request.app.state.db),
        roles=accounts.ROLES,
        min_password=accounts.MIN_PASSWORD,
        done=done,
        error=error,
    )


def _user_change(path: str, change: Callable[[], None], message: str) -> RedirectResponse:
    try:
        change()
    except AccountError as exc:
        return _back(path, error=str(exc))
    return _back(path, message)


@router.post("/admin/users")
def admin_add_user(
    request: Request,
    principal: Admin,
    name: Annotated[str, Form()],
    role: Annotated[str, Form()],
    password: Annotated[str, Form()],
) -> Response:
    db = request.app.state.db
    return _user_change(
        "/admin/users",
        lambda: accounts.add_user(db, name, role, password, actor=principal.actor),
        f"user {name} added as {role}",
    )


@router.post("/admin/users/{name}")
def admin_change_user(
    request: Request,
    principal: Admin,
    name: str,
    action: Annotated[str, Form()],
    role: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
) -> Response:
    """One form per user row: ``action`` is disable, enable, role or password."""
    db, actor = request.app.state.db, principal.actor
    if action in ("disable", "role") and name == principal.name and principal.via == "session":
        return _back("/admin/users", error="an admin cannot disable or demote themselves")
    changes: dict[str, tuple[Callable[[], None], str]] = {
        "disable": (lambda: accounts.set_disabled(db, name, True, actor=actor), f"{name} disabled"),
        "enable": (lambda: accounts.set_disabled(db, name, False, actor=actor), f"{name} enabled"),
        "role": (lambda: accounts.set_role(db, name, role, actor=actor), f"{name} is now {role}"),
        "password": (
            lambda: accounts.set_password(db, name, password, actor=actor),
            f"{name}'s password set",
        ),
    }
    if action not in changes:
        raise HTTPException(400, f"unknown action {action!r}")
    return _user_change("/admin/users", *changes[action])


def _tokens_page(request: Request, principal: Principal, **context: Any) -> HTMLResponse:
    return page(
        request,
        "admin_tokens.html",
        principal,
        tokens=accounts.tokens(request.app.state.db),
        roles=accounts.ROLES,
        **context,
    )


@router.get("/admin/tokens", response_class=HTMLResponse)
def admin_tokens(request: Request, principal: Admin, done: str = "", error: str = "") -> HTMLResponse:
    return _tokens_page(request, principal, done=done, error=error)


@router.post("/admin/tokens", response_class=HTMLResponse)
def admin_create_token(
    request: Request, principal: Admin, name: Annotated[str, Form()], role: Annotated[str, Form()]
) -> Response:
    """Shown on this response only: the token is not stored and cannot be shown again."""
    try:
        token = accounts.create_token(request.app.state.db, name, role, actor=principal.actor)
    except AccountError as exc:
        return _back("/admin/tokens", error=str(exc))
    return _tokens_page(request, principal, new_token=token, new_name=name)


@router.post("/admin/tokens/{name}/revoke")
def admin_revoke_token(request: Request, principal: Admin, name: str) -> Response:
    db = request.app.state.db
    return _user_change(
        "/admin/tokens",
        lambda: accounts.revoke_token(db, name, actor=principal.actor),
        f"token {name} revoked",
    )
