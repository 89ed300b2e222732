"""Accounts: users with argon2 password hashes, their login sessions, and API tokens scoped to a role.

What the dashboard and the ``ainode users``/``ainode tokens`` commands share. Every change, login and
logout is audited in the transaction that makes it. Session cookies and API tokens are long random
strings kept only as their SHA-256 (a fast hash is enough for 256 random bits; argon2's cost is for
passwords people choose), so a copy of the database opens no session and holds no usable token.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from node import audit
from node.config import WebSettings
from node.db import ApiToken, Database, User, WebSession, utcnow

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")  # each may do what the ones before it may
MIN_PASSWORD = 10
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")  # names appear in audit actors and URLs: keep them plain
TOKEN_PREFIX = "ainode_"  # tells a leaked token apart in logs and secret scanners

_hasher = PasswordHasher()  # argon2id, the library's current recommended parameters


class AccountError(ValueError):
    """A refused account change; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who makes a request: a logged-in user or an API token, and the role they act with."""

    name: str
    role: Role
    via: Literal["session", "token"]

    @property
    def actor(self) -> str:
        """What audit events record as the actor."""
        return f"{'user' if self.via == 'session' else 'token'}:{self.name}"


@dataclass(frozen=True)
class Login:
    """A session just opened: ``token`` goes into the cookie and is nowhere else."""

    token: str
    principal: Principal
    expires_at: datetime


def role_at_least(role: str, wanted: Role) -> bool:
    return role in ROLES and ROLES.index(cast(Role, role)) >= ROLES.index(wanted)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise AccountError(f"{name!r}: a name is 1-64 letters, digits or . _ @ -")


def _check_role(role: str) -> Role:
    if role not in ROLES:
        raise AccountError(f"{role!r}: a role is one of {', '.join(ROLES)}")
    return cast(Role, role)


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password has at least {MIN_PASSWORD} characters")
    return _hasher.hash(password)


@functools.cache
def _decoy_hash() -> str:
    """Verified against for unknown names, so a wrong name costs as long as a wrong password."""
    return _hasher.hash(secrets.token_urlsafe(16))


def _password_matches(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def _user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise AccountError(f"no user named {name!r}")
    return user


def add_user(db: Database, name: str, role: str, password: str, *, actor: str) -> None:
    _check_name(name)
    checked = _check_role(role)
    password_hash = hash_password(password)  # slow on purpose: before the transaction
    with db.session() as session:
        if session.scalar(select(User.id).where(User.name == name)) is not None:
            raise AccountError(f"a user named {name!r} exists")
        session.add(User(name=name, role=checked, password_hash=password_hash))
        audit.record(session, "user.added", actor=actor, user=name, role=checked)


def set_password(db: Database, name: str, password: str, *, actor: str) -> None:
    """A new password also lifts a lockout and ends the user's sessions."""
    password_hash = hash_password(password)
    with db.session() as session:
        user = _user(session, name)
        user.password_hash, user.failed_logins, user.locked_until = password_hash, 0, None
        session.execute(delete(WebSession).where(WebSession.user_fk == user.id))
        audit.record(session, "user.password_changed", actor=actor, user=name)


def set_disabled(db: Database, name: str, disabled: bool, *, actor: str) -> None:
    """Disabling ends the user's sessions at once."""
    with db.session() as session:
        user = _user(session, name)
        user.disabled = disabled
        if disabled:
            session.execute(delete(WebSession).where(WebSession.user_fk == user.id))
        audit.record(session, "user.disabled" if disabled else "user.enabled", actor=actor, user=name)


def set_role(db: Database, name: str, role: str, *, actor: str) -> None:
    checked = _check_role(role)
    with db.session() as session:
        user = _user(session, name)
        before, user.role = user.role, checked
        audit.record(session, "user.role_changed", actor=actor, user=name, before=before, role=checked)


def users(db: Database) -> list[User]:
    with db.session() as session:
        return list(session.scalars(select(User).order_by(User.name)))


def lock_seconds(failures: int, web: WebSettings) -> float:
    """How long ``failures`` failed logins in a row lock an account: doubling from the threshold on."""
    if failures < web.lockout_after:
        return 0.0
    return float(min(web.lockout_seconds * 2 ** (failures - web.lockout_after), web.lockout_max_seconds))


def log_in(
    db: Database, name: str, password: str, web: WebSettings, client: str, replaces: str | None = None
) -> Login | None:
    """A new session for ``name``, or None (wrong name or password, locked or disabled; the audit log
    says which). The browser's earlier session (``replaces``, its cookie) ends with the new one's
    start, so a session never outlives the login that superseded it."""
    actor = "user:" + "".join(c for c in name[:64] if c.isprintable())  # as typed, but never a control
    with db.session() as session:
        user = session.scalar(select(User).where(User.name == name))
        found = (user.id, user.password_hash, user.disabled, user.locked_until) if user else None
    now = utcnow()
    matches = _password_matches(found[1] if found else _decoy_hash(), password)
    with db.session() as session:
        if found is None:
            audit.record(
                session, "user.login", actor=actor, outcome="failure", client=client, reason="unknown"
            )
            return None
        user_id = found[0]
        # Read again, locked, after the slow hash: logins racing the one that locks the account see it.
        disabled, locked_until = session.execute(
            select(User.disabled, User.locked_until).where(User.id == user_id).with_for_update()
        ).one()
        if disabled or (locked_until is not None and locked_until > now):
            reason = "disabled" if disabled else "locked"
            audit.record(session, "user.login", actor=actor, outcome="failure", client=client, reason=reason)
            return None
        if not matches:
            failures = session.scalar(
                update(User)
                .where(User.id == user_id)
                .values(failed_logins=User.failed_logins + 1)
                .returning(User.failed_logins)
            )
            locked = lock_seconds(failures or 0, web)
            if locked:
                session.execute(
                    update(User)
                    .where(User.id == user_id)
                    .values(locked_until=now + timedelta(seconds=locked))
                )
            audit.record(
                session,
                "user.login",
                actor=actor,
                outcome="failure",
                client=client,
                reason="wrong password",
                failures=failures,
                locked_seconds=locked,
            )
            return None
        user = session.get_one(User, user_id)
        user.failed_logins, user.locked_until, user.last_login_at = 0, None, now
        if _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = _hasher.hash(password)
        session.execute(delete(WebSession).where(WebSession.expires_at <= now))
        if replaces:
            session.execute(delete(WebSession).where(WebSession.token_hash == digest(replaces)))
        token = secrets.token_urlsafe(32)
        expires_at = now + timedelta(hours=web.session_hours)
        session.add(WebSession(token_hash=digest(token), user_fk=user_id, expires_at=expires_at))
        audit.record(session, "user.login", actor=actor, client=client)
        return Login(token, Principal(name, _check_role(user.role), "session"), expires_at)


def session_principal(db: Database, token: str) -> Principal | None:
    """The user whose unexpired session ``token`` opens, unless disabled since."""
    with db.session() as session:
        user = session.scalar(
            select(User)
            .join(WebSession, WebSession.user_fk == User.id)
            .where(WebSession.token_hash == digest(token), WebSession.expires_at > utcnow())
        )
        if user is None or user.disabled:
            return None
        return Principal(user.name, _check_role(user.role), "session")


def log_out(db: Database, token: str, *, actor: str, client: str) -> None:
    with db.session() as session:
        session.execute(delete(WebSession).where(WebSession.token_hash == digest(token)))
        audit.record(session, "user.logout", actor=actor, client=client)


def create_token(db: Database, name: str, role: str, *, actor: str) -> str:
    """A new API token; the caller shows it once, the database keeps only its hash."""
    _check_name(name)
    checked = _check_role(role)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with db.session() as session:
        if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
            raise AccountError(f"a token named {name!r} exists (revoked tokens keep their names)")
        session.add(ApiToken(name=name, role=checked, token_hash=digest(token), created_by=actor))
        audit.record(session, "token.created", actor=actor, token=name, role=checked)
    return token


def revoke_token(db: Database, name: str, *, actor: str) -> None:
    with db.session() as session:
        token = session.scalar(select(ApiToken).where(ApiToken.name == name))
        if token is None:
            raise AccountError(f"no token named {name!r}")
        if token.revoked_at is not None:
            raise AccountError(f"token {name!r} was revoked at {token.revoked_at:%Y-%m-%d %H:%M} UTC")
        token.revoked_at = utcnow()
        audit.record(session, "token.revoked", actor=actor, token=name)


def tokens(db: Database) -> list[ApiToken]:
    with db.session() as session:
        return list(session.scalars(select(ApiToken).order_by(ApiToken.name)))


def token_principal(db: Database, token: str) -> Principal | None:
    """The API token ``token`` is, unless revoked; notes when it was last used."""
    with db.session() as session:
        found = session.scalar(
            select(ApiToken).where(ApiToken.token_hash == digest(token), ApiToken.revoked_at.is_(None))
        )
        if found is None:
            return None
        found.last_used_at = utcnow()
        return Principal(found.name, _check_role(found.role), "token")
