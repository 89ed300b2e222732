"""Helpers for tests of the HTTP app: an app client, users, logging in, the session's CSRF token."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from node import accounts
from node.config import Settings
from node.db import Database
from node.spool import Spool
from node.web.app import create_app
from node.web.auth import SESSION_COOKIE, csrf_token

PASSWORD = "correct horse battery"  # long enough for accounts.MIN_PASSWORD


def client(db: Database, spool: Spool, settings: Settings | None = None) -> TestClient:
    """A client of a fresh app. Over https, so the Secure cookies the node sets by default travel."""
    app = create_app(db, spool, settings or Settings())
    return TestClient(app, base_url="https://testserver", follow_redirects=False)


def make_user(db: Database, name: str, role: str, password: str = PASSWORD) -> None:
    accounts.add_user(db, name, role, password, actor="test")


def login(client: TestClient, name: str, password: str = PASSWORD) -> None:
    """Log in through the login form, as a browser does; fails the test if the node refuses."""
    form = client.get("/login")
    assert form.status_code == 200, form.text
    match = re.search(r'name="login_token" value="([^"]+)"', form.text)
    assert match, "the login form carries its token"
    response = client.post(
        "/login", data={"name": name, "password": password, "login_token": match.group(1), "next": "/"}
    )
    assert response.status_code == 303, f"login of {name} refused: {response.status_code}"
    assert client.cookies.get(SESSION_COOKIE)


def csrf(client: TestClient) -> str:
    """The CSRF token the pages of ``client``'s session put in their forms."""
    session = client.cookies.get(SESSION_COOKIE)
    assert session, "log in first"
    return csrf_token(session)


def logged_in(db: Database, spool: Spool, role: str, settings: Settings | None = None) -> TestClient:
    """A client logged in as a new user named after ``role``."""
    made = client(db, spool, settings)
    make_user(db, role, role)
    login(made, role)
    return made
