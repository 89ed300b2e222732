"""Append-only audit log: every step a study takes, and every PHI access, as a keyed hash chain.

Each event's hash covers the previous event's hash, so a deleted or edited row breaks the chain and
:func:`check` finds it. The hash is an HMAC-SHA256 under a key kept in a file outside the database
(:func:`configure`), so someone who can write the database but not read that file cannot re-hash an
edited chain into a valid one. A chain begun before the node had a key is kept as it is: its events
carry plain SHA-256 hashes, and the first keyed event, ``audit.keyed``, records that every event from
itself on is keyed — its own HMAC covers the last unkeyed hash, which pins the older part too. A
process that was not given the key refuses to extend a keyed chain (:class:`AuditKeyError`) rather
than add events nobody could verify.

An event is recorded in the transaction whose change it describes (:func:`record`, stamped with the
time it was recorded) and joins the chain when that transaction commits: only then is the appender
serialised, by the database — a PostgreSQL advisory lock, or SQLite's writer lock — while it reads
the chain's head and inserts the events. So two writers never fork the chain, whichever process they
run in, and no work a transaction does before it commits waits on the audit log. (With SQLite that
relies on pysqlite's default transaction handling, which begins a transaction at its first write, so
the head is read by the transaction holding the lock.) Once committed, the events are handed to the
database's forwarder, if any (``node.audit_forward``), which never holds up or fails the transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import weakref
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, false, select, text, update
from sqlalchemy.orm import Session, SessionTransaction

from node.audit_forward import SyslogForwarder
from node.config import ConfigError, Settings
from node.db import AuditEvent, Database, utcnow

log = logging.getLogger(__name__)

GENESIS = "0" * 64
KEYED = "audit.keyed"  # the first keyed event: every event from it on is keyed
_ADVISORY_KEY = 0x41494E4F  # "AINO"
_PENDING = "audit.pending"  # session.info key: events recorded in the session's transaction
_COMMITTING = "audit.committing"  # session.info key: events chained, forwarded once committed


@dataclass
class _Binding:
    key: bytes | None = None
    keyed: bool = False  # the chain is known to hold its audit.keyed event
    forward: SyslogForwarder | None = None


_bindings: weakref.WeakKeyDictionary[Engine, _Binding] = weakref.WeakKeyDictionary()
_keys: dict[str, bytes] = {}  # by database URL: other engines this process opens on it use the key too


class AuditKeyError(ConfigError):
    """The audit key is missing, unreadable or not the one the chain was keyed with: the node's
    configuration is at fault, and nothing that would be audited may go on."""


def _body(prev_hash: str, event: AuditEvent) -> bytes:
    body = {
        "prev": prev_hash,
        "at": event.at.astimezone(UTC).isoformat(),
        "action": event.action,
        "outcome": event.outcome,
        "actor": event.actor,
        "study_uid": event.study_uid,
        "detail": event.detail,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _digest(prev_hash: str, event: AuditEvent, key: bytes | None) -> str:
    body = _body(prev_hash, event)
    if key is None:
        return hashlib.sha256(body).hexdigest()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def fingerprint(key: bytes) -> str:
    """Names a key without revealing it: recorded in ``audit.keyed`` so a wrong key file is named."""
    return hmac.new(key, b"ainode audit key", hashlib.sha256).hexdigest()[:16]


def key_path(settings: Settings) -> Path:
    return settings.audit.key_file or settings.node.data_dir / "audit.key"


def read_key(path: Path) -> bytes:
    """The key in ``path`` (64 hex digits). Raises AuditKeyError."""
    try:
        key = bytes.fromhex(path.read_text().strip())
    except OSError as exc:
        raise AuditKeyError(f"audit key file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise AuditKeyError(f"audit key file {path}: not 64 hex digits") from exc
    if len(key) != 32:
        raise AuditKeyError(f"audit key file {path}: not 64 hex digits")
    if path.stat().st_mode & 0o077:
        raise AuditKeyError(f"audit key file {path}: others than its owner may read it; chmod 600 it")
    return key


def _create_key(path: Path) -> bytes:
    """A new random key, written whole with mode 0600 before it appears under ``path``: a second
    process creating it at the same moment reads the first one's instead."""
    key = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (key.hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    except FileExistsError:
        return read_key(path)
    finally:
        temp.unlink()
    log.info(
        "created the audit key %s (fingerprint %s): back it up apart from the database",
        path,
        fingerprint(key),
    )
    return key


def _marker(session: Session) -> AuditEvent | None:
    return session.scalars(
        select(AuditEvent).where(AuditEvent.action == KEYED).order_by(AuditEvent.id).limit(1)
    ).first()


def configure(db: Database, settings: Settings) -> bytes:
    """Key ``db``'s chain with the key file ``[audit] key_file`` (created on first use when the chain
    has never been keyed), and forward its committed events to the syslog ``[audit]`` names. Every
    process that writes audit events calls this once per database, and :func:`close` when done.
    Raises AuditKeyError when the key file is missing or not the key the chain was keyed with."""
    path = key_path(settings)
    with db.session() as session:
        marker = _marker(session)
    if path.exists():
        key = read_key(path)
        if marker is None:
            raise AuditKeyError(
                f"audit key file {path} exists, but no audit event is keyed: the keyed events were "
                "deleted (run `ainode audit verify`). To start a new chain on purpose, move the key "
                "file away first."
            )
    elif marker is not None:
        raise AuditKeyError(
            f"audit key file {path} is missing, but the audit chain is keyed since event {marker.id}: "
            "restore the key file from its backup (a new key would leave the chain unverifiable)"
        )
    else:
        key = _create_key(path)
    if marker is not None and marker.detail.get("key_fingerprint") != fingerprint(key):
        raise AuditKeyError(
            f"audit key file {path} (fingerprint {fingerprint(key)}) is not the key the chain was keyed "
            f"with at event {marker.id} (fingerprint {marker.detail.get('key_fingerprint')})"
        )
    close(db)
    forward = SyslogForwarder(settings) if settings.audit.syslog_host else None
    _bindings[db.engine] = _Binding(key=key, keyed=marker is not None, forward=forward)
    _keys[_url(db.engine)] = key
    return key


def close(db: Database) -> None:
    """Send the forwarded events still queued: before the process ends or ``db`` is disposed."""
    binding = _bindings.get(db.engine)
    if binding is not None and binding.forward is not None:
        binding.forward.close()
        binding.forward = None


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def _binding_of(engine: Engine) -> _Binding:
    """The engine's key and forwarder; an engine on a database this process was given the key for
    gets that key (without the forwarder, which belongs to the process's own database)."""
    binding = _bindings.get(engine)
    if binding is None:
        binding = _bindings[engine] = _Binding(key=_keys.get(_url(engine)))
    return binding


def bound_key(db: Database) -> bytes | None:
    return _binding_of(db.engine).key


def record(
    session: Session,
    action: str,
    *,
    actor: str = "node",
    study_uid: str = "",
    outcome: str = "success",
    **detail: Any,
) -> None:
    """Record one event; it is appended when ``session``'s transaction commits, with the changes it
    describes, and dropped if that transaction rolls back. (Not inside a savepoint that may roll back
    alone: its events would still be appended.)"""
    # JSON round trip so the hash covers exactly what the database stores and returns.
    stored = json.loads(json.dumps(detail, default=str))
    session.info.setdefault(_PENDING, []).append(
        AuditEvent(
            at=utcnow(), action=action, outcome=outcome, actor=actor, study_uid=study_uid, detail=stored
        )
    )


def append(db: Database, action: str, **kwargs: Any) -> None:
    """Record one event in its own transaction."""
    with db.session() as session:
        record(session, action, **kwargs)


def _binding(session: Session) -> _Binding:
    bind = session.get_bind()
    return _binding_of(bind if isinstance(bind, Engine) else bind.engine)


@event.listens_for(Session, "before_commit")
def _chain(session: Session) -> None:
    """The one serialised appender: the transaction's own changes are written first (so it holds no
    lock another appender could wait on), then the database's lock is taken and the events chained."""
    if session.get_nested_transaction() is not None:
        return  # a savepoint is released: the events wait for the transaction itself to commit
    events = session.info.pop(_PENDING, None)
    if not events:
        return
    session.flush()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_KEY})
    else:  # SQLite admits one writer at a time: a write that changes nothing takes its lock
        session.execute(update(AuditEvent).where(false()).values(outcome=AuditEvent.outcome))
    binding = _binding(session)
    if not binding.keyed:
        marker = _marker(session)
        if binding.key is None and marker is not None:
            raise AuditKeyError(
                f"the audit chain is keyed since event {marker.id}, but this process has no audit key "
                "(node.audit.configure was not called for this database)"
            )
        if binding.key is not None and marker is None:
            events.insert(
                0,
                AuditEvent(
                    at=utcnow(),
                    action=KEYED,
                    outcome="success",
                    actor="node",
                    study_uid="",
                    detail={"key_fingerprint": fingerprint(binding.key)},
                ),
            )
        binding.keyed = binding.key is not None and marker is not None
    prev = session.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)) or GENESIS
    for pending in events:
        pending.prev_hash = prev
        pending.hash = prev = _digest(prev, pending, binding.key)
        session.add(pending)
    session.info[_COMMITTING] = events


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    """The events are in the chain now: the marker, if this was it, and a copy for the forwarder."""
    events = session.info.pop(_COMMITTING, None)
    if not events:
        return
    binding = _binding(session)
    binding.keyed = binding.keyed or any(e.action == KEYED for e in events)
    if binding.forward is not None:
        try:
            binding.forward(events)
        except Exception:  # forwarding is a copy: the events are committed whatever becomes of it
            log.exception("could not forward %d audit event(s)", len(events))


@event.listens_for(Session, "after_transaction_end")
def _forget(session: Session, transaction: SessionTransaction) -> None:
    """A transaction that ended without committing takes its events with it."""
    if transaction.parent is None:
        session.info.pop(_PENDING, None)
        session.info.pop(_COMMITTING, None)


@dataclass(frozen=True)
class Break:
    """The first event whose hash does not follow from the chain, and what is wrong with it."""

    event_id: int
    problem: str


@dataclass(frozen=True)
class ChainState:
    events: int  # events read up to the break (all when intact)
    intact_to: int | None  # the last event that follows from the chain (None: none does)
    keyed_from: int | None  # the audit.keyed event, if the chain has one
    broken: Break | None


def _problem(
    stored: AuditEvent, prev: str, prev_id: int | None, key: bytes | None, keyed: bool
) -> str | None:
    if stored.prev_hash != prev:
        where = f"event {prev_id}'s hash" if prev_id is not None else "the chain's start"
        return (
            f"its previous hash is not {where}: events before it were deleted, or its previous hash "
            "was changed"
        )
    if keyed and key is None:
        return "keyed: the audit key file is needed to verify this event and those after it"
    named = stored.detail.get("key_fingerprint") if stored.action == KEYED else None
    if key is not None and named is not None and named != fingerprint(key):
        return f"keyed with another key (fingerprint {named}) than this one ({fingerprint(key)})"
    if _digest(prev, stored, key if keyed else None) == stored.hash:
        return None
    if keyed and _digest(prev, stored, None) == stored.hash:
        return "re-hashed with plain SHA-256 instead of the key's HMAC: forged without the key"
    if keyed:
        return "its hash is not the HMAC of its content: the event was edited (or the key is not the chain's)"
    return "its hash does not match its content: the event was edited"


def check(db: Database, key: bytes | None = None) -> ChainState:
    """Walk the chain from its start; ``key`` defaults to the one :func:`configure` bound to ``db``."""
    key = key if key is not None else bound_key(db)
    prev, prev_id, keyed_from, count = GENESIS, None, None, 0
    with db.session() as session:
        for stored in session.scalars(select(AuditEvent).order_by(AuditEvent.id)).yield_per(1000):
            if keyed_from is None and stored.action == KEYED:
                keyed_from = stored.id
            problem = _problem(stored, prev, prev_id, key, keyed_from is not None)
            if problem is not None:
                return ChainState(count, prev_id, keyed_from, Break(stored.id, problem))
            prev, prev_id, count = stored.hash, stored.id, count + 1
    if key is not None and keyed_from is None:
        # A key exists, so the node keyed the chain; an unkeyed chain was rewritten from its start.
        broken = Break(
            prev_id or 0,  # 0: the log is empty
            "no event is keyed though an audit key exists: the keyed events were removed (or nothing "
            "was recorded since the key was made)",
        )
        return ChainState(count, None, None, broken)
    return ChainState(count, prev_id, keyed_from, None)


def verify(db: Database, key: bytes | None = None) -> Break | None:
    """The first broken link, or None if the chain is intact."""
    return check(db, key).broken
