"""Accounts and access: logins, sessions, lockout, CSRF, API tokens and roles, the admin pages, the CLI."""

from __future__ import annotations

import io
import re
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from node import accounts
from node.cli import main
from node.config import Settings, WebSettings
from node.db import AuditEvent, Database, User, WebSession, utcnow
from node.spool import Spool
from node.web.auth import LOGIN_COOKIE, SESSION_COOKIE
from tests.web import PASSWORD, client, csrf, logged_in, login, make_user


def _events(db: Database, action: str) -> list[AuditEvent]:
    with db.session() as session:
        return list(
            session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        )


def _try_login(web: TestClient, name: str, password: str) -> int:
    """The status of one login attempt through the form."""
    form = web.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', form.text)
    assert token
    data = {"name": name, "password": password, "login_token": token.group(1)}
    return web.post("/login", data=data).status_code


def _set_cookie(response_headers: list[str], name: str) -> str:
    [header] = [h for h in response_headers if h.startswith(f"{name}=")]
    return header


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def test_login_logout_and_the_session_they_bound(db: Database, spool: Spool) -> None:
    web = client(db, spool)
    make_user(db, "ana", "viewer")
    assert web.get("/api/studies").status_code == 401
    login(web, "ana")
    session_cookie = web.cookies[SESSION_COOKIE]
    assert web.get("/api/studies").status_code == 200

    [event] = _events(db, "user.login")
    assert (event.actor, event.outcome, event.detail["client"]) == ("user:ana", "success", "testclient")
    with db.session() as session:  # the database holds the cookie's hash only
        [stored] = session.scalars(select(WebSession)).all()
        assert (
            stored.token_hash == accounts.digest(session_cookie) and session_cookie not in stored.token_hash
        )

    out = web.post("/logout", data={"csrf_token": csrf(web)})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert SESSION_COOKIE not in web.cookies
    [event] = _events(db, "user.logout")
    assert event.actor == "user:ana"
    # The old cookie, replayed, opens nothing: the session is gone from the database.
    replay = client(db, spool)
    replay.cookies.set(SESSION_COOKIE, session_cookie)
    assert replay.get("/api/studies").status_code == 401
    assert replay.get("/admin/users").headers["location"] == "/login?next=/admin/users"


def test_wrong_password_and_unknown_name_are_refused_and_audited(db: Database, spool: Spool) -> None:
    web = client(db, spool)
    make_user(db, "ana", "operator")
    assert _try_login(web, "ana", "not the password") == 401
    assert _try_login(web, "nobody", PASSWORD) == 401
    assert SESSION_COOKIE not in web.cookies
    failures = _events(db, "user.login")
    assert [(e.actor, e.outcome, e.detail["reason"]) for e in failures] == [
        ("user:ana", "failure", "wrong password"),
        ("user:nobody", "failure", "unknown"),
    ]
    assert all("not the password" not in str(e.detail) for e in failures)  # no password in the log


def test_lockout_after_failures_grows_and_ends(db: Database, spool: Spool) -> None:
    web_settings = WebSettings(lockout_after=3, lockout_seconds=60, lockout_max_seconds=200)
    web = client(db, spool, Settings(web=web_settings))
    make_user(db, "ana", "admin")
    for _ in range(3):
        assert _try_login(web, "ana", "wrong password!") == 401
    assert _try_login(web, "ana", PASSWORD) == 401  # locked: even the right password is refused
    assert [e.detail["reason"] for e in _events(db, "user.login")][-1] == "locked"
    with db.session() as session:
        user = session.scalars(select(User).where(User.name == "ana")).one()
        assert user.failed_logins == 3 and user.locked_until is not None
        assert timedelta(seconds=50) < user.locked_until - utcnow() <= timedelta(seconds=60)

    def expire_lock() -> None:
        with db.session() as session:
            session.execute(update(User).values(locked_until=utcnow() - timedelta(seconds=1)))

    expire_lock()
    assert _try_login(web, "ana", "wrong again!!") == 401  # one more failure: a lock twice as long
    assert _events(db, "user.login")[-1].detail["locked_seconds"] == 120
    assert [accounts.lock_seconds(n, web_settings) for n in (2, 3, 4, 5, 9)] == [0, 60, 120, 200, 200]
    expire_lock()
    login(web, "ana")  # the lock over, the right password works and the count starts again
    with db.session() as session:
        user = session.scalars(select(User).where(User.name == "ana")).one()
        assert user.failed_logins == 0 and user.locked_until is None


def test_cookie_flags_and_expiry(db: Database, spool: Spool) -> None:
    make_user(db, "ana", "viewer")
    for secure in (True, False):
        web = client(db, spool, Settings(web=WebSettings(secure_cookies=secure, session_hours=2)))
        form = web.get("/login")
        login_cookie = _set_cookie(form.headers.get_list("set-cookie"), LOGIN_COOKIE).lower()
        assert "httponly" in login_cookie and ("; secure" in login_cookie) is secure
        token = re.search(r'name="login_token" value="([^"]+)"', form.text)
        assert token
        response = web.post(
            "/login", data={"name": "ana", "password": PASSWORD, "login_token": token.group(1)}
        )
        cookie = _set_cookie(response.headers.get_list("set-cookie"), SESSION_COOKIE).lower()
        assert (
            "httponly" in cookie
            and "samesite=strict" in cookie
            and "path=/" in cookie
            and "expires=" in cookie
        )
        assert ("; secure" in cookie) is secure
        with db.session() as session:
            stored = session.scalar(
                select(WebSession).where(
                    WebSession.token_hash == accounts.digest(web.cookies[SESSION_COOKIE])
                )
            )
            assert stored is not None
            assert (
                timedelta(hours=2) - timedelta(minutes=1) < stored.expires_at - utcnow() <= timedelta(hours=2)
            )
        # Past its expiry the session opens nothing, whatever the browser still sends.
        with db.session() as session:
            session.execute(update(WebSession).values(expires_at=utcnow() - timedelta(seconds=1)))
        assert web.get("/api/studies").status_code == 401


def test_csrf_refused_when_forged_or_missing(db: Database, spool: Spool) -> None:
    admin = logged_in(db, spool, "admin")
    new = {"name": "eve", "role": "admin", "password": PASSWORD}
    forged = admin.post("/admin/users", data={**new, "csrf_token": "0" * 64})
    missing = admin.post("/admin/users", data=new)
    assert forged.status_code == missing.status_code == 403
    assert "CSRF" in forged.text
    assert "eve" not in [u.name for u in accounts.users(db)]
    # The same request with the session's token, as a form field or as a header, is made.
    assert admin.post("/admin/users", data={**new, "csrf_token": csrf(admin)}).status_code == 303
    by_header = admin.post(
        "/admin/users/eve", data={"action": "disable"}, headers={"X-CSRF-Token": csrf(admin)}
    )
    assert by_header.status_code == 303
    assert [(u.name, u.disabled) for u in accounts.users(db)] == [("admin", False), ("eve", True)]
    # Logging in needs the login form's own token too: no one else's page can log a browser in.
    web = client(db, spool)
    assert web.post("/login", data={"name": "admin", "password": PASSWORD}).status_code == 403
    assert SESSION_COOKIE not in web.cookies


def test_every_route_needs_credentials_and_a_token_opens_the_api(db: Database, spool: Spool) -> None:
    """JSON routes answer 401, pages send to the login page; only /healthz and /login are open."""
    anonymous = client(db, spool)
    paths = anonymous.app.openapi()["paths"]  # type: ignore[attr-defined]
    assert {"/api/studies", "/api/studies/{study_uid}", "/metrics", "/admin/users"} <= set(paths)
    for template, methods in paths.items():
        path = re.sub(r"\{[^}]+\}", "1.2.3", template)
        for method in methods:
            response = anonymous.request(method, path)
            if template in ("/healthz", "/login"):  # a login without the form's token is refused
                assert response.status_code == (403 if method == "post" else 200), f"{method} {template}"
            elif template.startswith("/api/") or template == "/metrics":
                assert response.status_code == 401, f"{method} {template}"
                assert response.headers["www-authenticate"] == "Bearer" and response.json()["detail"]
            else:
                assert response.status_code == 303, f"{method} {template}"
                assert response.headers["location"].startswith("/login?next=/")
    bad = {"Authorization": "Bearer ainode_not-a-token"}
    assert anonymous.get("/api/studies", headers=bad).status_code == 401
    health = anonymous.get("/healthz")
    assert health.status_code == 200 and set(health.json()) <= {"status", "dicom", "disk_free_mb", "database"}

    token = accounts.create_token(db, "prometheus", "viewer", actor="test")
    bearer = {"Authorization": f"Bearer {token}"}
    assert anonymous.get("/api/studies", headers=bearer).json() == []
    assert "ainode_jobs" in anonymous.get("/metrics", headers=bearer).text
    [listed] = accounts.tokens(db)
    assert listed.last_used_at is not None and listed.token_hash == accounts.digest(token)


def test_token_roles_revocation_and_pages(db: Database, spool: Spool) -> None:
    web = client(db, spool)
    viewer = {"Authorization": f"Bearer {accounts.create_token(db, 'wallboard', 'viewer', actor='test')}"}
    operator = {"Authorization": f"Bearer {accounts.create_token(db, 'script', 'operator', actor='test')}"}
    # Re-running a study is an operator's action: a viewer token is refused before anything happens.
    refused = web.post("/studies/1.2.3/rerun", headers=viewer)
    assert refused.status_code == 403 and "operator" in refused.text
    assert web.post("/studies/1.2.3/rerun", headers=operator).status_code not in (401, 403)
    assert web.post("/admin/tokens", data={"name": "x", "role": "admin"}, headers=operator).status_code == 403
    # A page opened with a too-low role is a 403 page, not a login loop.
    assert web.get("/admin/users", headers=operator).status_code == 403

    accounts.revoke_token(db, "wallboard", actor="test")
    assert web.get("/api/studies", headers=viewer).status_code == 401
    with pytest.raises(accounts.AccountError, match="revoked"):
        accounts.revoke_token(db, "wallboard", actor="test")
    [created, _] = _events(db, "token.created")
    [revoked] = _events(db, "token.revoked")
    assert (created.detail, revoked.detail) == (
        {"token": "wallboard", "role": "viewer"},
        {"token": "wallboard"},
    )


def test_disabled_user_is_refused_at_once(db: Database, spool: Spool) -> None:
    web = logged_in(db, spool, "operator")
    assert web.get("/api/studies").status_code == 200
    accounts.set_disabled(db, "operator", True, actor="test")
    assert web.get("/api/studies").status_code == 401  # the open session ends with the account
    assert _try_login(client(db, spool), "operator", PASSWORD) == 401
    assert _events(db, "user.login")[-1].detail["reason"] == "disabled"
    accounts.set_disabled(db, "operator", False, actor="test")
    login(client(db, spool), "operator")


def test_admin_pages_manage_users_and_tokens(db: Database, spool: Spool) -> None:
    admin = logged_in(db, spool, "admin")
    page = admin.get("/admin/users")
    assert page.status_code == 200 and f'name="csrf_token" value="{csrf(admin)}"' in page.text
    assert 'href="/admin/tokens"' in page.text and "NOT FOR DIAGNOSTIC USE" in page.text

    def post(path: str, **form: str) -> str:
        response = admin.post(path, data={**form, "csrf_token": csrf(admin)})
        assert response.status_code == 303, response.text
        return admin.get(response.headers["location"]).text

    assert "user bo added as viewer" in post("/admin/users", name="bo", role="viewer", password=PASSWORD)
    assert "at least 10 characters" in post("/admin/users", name="cy", role="viewer", password="short")
    assert "bo is now operator" in post("/admin/users/bo", action="role", role="operator")
    assert "bo&#39;s password set" in post("/admin/users/bo", action="password", password="another long one")
    assert "cannot disable or demote themselves" in post("/admin/users/admin", action="disable")
    assert [(u.name, u.role) for u in accounts.users(db)] == [("admin", "admin"), ("bo", "operator")]
    login(client(db, spool), "bo", "another long one")

    created = admin.post("/admin/tokens", data={"name": "ci", "role": "viewer", "csrf_token": csrf(admin)})
    shown = re.search(r'<code class="token">(ainode_[^<]+)</code>', created.text)
    assert created.status_code == 200 and shown and created.headers["cache-control"] == "no-store"
    bearer = {"Authorization": f"Bearer {shown.group(1)}"}
    assert admin.get("/admin/tokens").text.count(shown.group(1)) == 0  # shown once, never again
    assert client(db, spool).get("/api/studies", headers=bearer).status_code == 200
    assert "token ci revoked" in post("/admin/tokens/ci/revoke")
    assert client(db, spool).get("/api/studies", headers=bearer).status_code == 401
    actions = [(e.action, e.actor) for e in _events(db, "user.role_changed") + _events(db, "token.revoked")]
    assert actions == [("user.role_changed", "user:admin"), ("token.revoked", "user:admin")]


def test_login_redirects_back_but_never_off_the_node(db: Database, spool: Spool) -> None:
    web = client(db, spool)
    make_user(db, "ana", "admin")
    assert web.get("/admin/tokens?done=x").headers["location"] == "/login?next=/admin/tokens%3Fdone%3Dx"
    for target, landing in (("/admin/tokens", "/admin/tokens"), ("//evil.example/x", "/")):
        form = web.get("/login", params={"next": target})
        token = re.search(r'name="login_token" value="([^"]+)"', form.text)
        assert token
        data = {"name": "ana", "password": PASSWORD, "login_token": token.group(1), "next": target}
        assert web.post("/login", data=data).headers["location"] == landing


def test_users_and_tokens_commands(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "var"\ndatabase_url = "{database_url}"\n')

    def ainode(*argv: str, stdin: str = "") -> tuple[int, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main([*argv, "--config", str(config)])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    assert (
        ainode("users", "add", "root", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n")[0] == 0
    )
    code, said = ainode("users", "add", "root", "--role", "viewer", "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 2 and "exists" in said
    code, said = ainode("users", "add", "x", "--role", "viewer", "--password-stdin", stdin="short\n")
    assert code == 2 and "at least 10 characters" in said
    assert ainode("users", "passwd", "root", "--password-stdin", stdin="a new long password\n")[0] == 0
    assert ainode("users", "disable", "root")[0] == 0
    code, said = ainode("users", "list")
    assert code == 0 and re.search(r"root\s+admin\s+disabled", said)
    code, said = ainode("tokens", "create", "grafana", "--role", "viewer")
    token = said.split()[0]
    assert code == 0 and token.startswith("ainode_") and "shown this once" in said
    assert ainode("tokens", "revoke", "grafana")[0] == 0
    code, said = ainode("tokens", "list")
    assert re.search(r"grafana\s+viewer\s+revoked", said) and token not in said

    from node.db import open_database

    db = open_database(database_url)
    try:
        assert accounts.token_principal(db, token) is None
        web = client(db, Spool(tmp_path / "spool"))
        assert _try_login(web, "root", "a new long password") == 401  # disabled
        accounts.set_disabled(db, "root", False, actor="test")
        assert _try_login(web, "root", PASSWORD) == 401  # the old password no longer opens it
        login(web, "root", "a new long password")
        with db.session() as session:
            events = session.execute(
                select(AuditEvent.action, AuditEvent.actor).where(AuditEvent.actor.like("cli:%"))
            ).all()
        assert [action for action, _ in events] == [
            "user.added",
            "user.password_changed",
            "user.disabled",
            "token.created",
            "token.revoked",
        ]
    finally:
        db.dispose()


def test_a_new_login_ends_the_browsers_earlier_session(db: Database, spool: Spool) -> None:
    web = client(db, spool)
    make_user(db, "ana", "viewer")
    login(web, "ana")
    first = web.cookies[SESSION_COOKIE]
    login(web, "ana")
    assert web.cookies[SESSION_COOKIE] != first
    replay = client(db, spool)
    replay.cookies.set(SESSION_COOKIE, first)
    assert replay.get("/api/studies").status_code == 401
    with db.session() as session:
        assert len(session.scalars(select(WebSession)).all()) == 1


def test_only_admins_see_the_configuration_and_never_the_database_password(
    db: Database, spool: Spool
) -> None:
    settings = Settings.model_validate(
        {"node": {"database_url": "postgresql+psycopg://ainode:s3cret@db/ainode"}}
    )
    operator = logged_in(db, spool, "operator", settings)
    assert operator.get("/admin/configuration").status_code == 403
    admin = logged_in(db, spool, "admin", settings)
    shown = admin.get("/admin/configuration")
    assert shown.status_code == 200
    assert "ainode:***@db/ainode" in shown.text and "s3cret" not in shown.text
    assert "[node]" in shown.text and 'href="/admin/configuration"' in shown.text
    [viewed] = _events(db, "configuration.viewed")
    assert viewed.actor == "user:admin"
