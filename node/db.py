"""The node's database: what arrived, what was done with it, and what was sent — SQLite or PostgreSQL.

The schema is owned by Alembic (``node/migrations``); :func:`open_database` brings any database to
the newest revision before the node uses it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
CONNECT_TIMEOUT = 5  # seconds to reach PostgreSQL before the attempt counts as the database being away


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class SeriesStatus(enum.StrEnum):
    RECEIVING = "receiving"  # instances arriving; waiting for the quiet period
    READY = "ready"  # complete; to be routed (for a study-level route, once its whole study is stable)
    ROUTED = "routed"  # jobs created
    NO_ROUTE = "no_route"  # complete, no route matched: recorded, not an error


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class SendStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # gave up after the configured attempts


def _enum(cls: type[enum.StrEnum]) -> Enum:
    return Enum(cls, values_callable=lambda e: [m.value for m in e], native_enum=False, length=16)


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # When the whole study was last complete: no series receiving, no instance for stable_seconds
    # (node.ingest.completion). Null while instances may still come; study-level routes wait for it.
    stable_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    status: Mapped[SeriesStatus] = mapped_column(
        _enum(SeriesStatus), default=SeriesStatus.RECEIVING, index=True
    )
    instance_count: Mapped[int] = mapped_column(default=0)
    late_instances: Mapped[int] = mapped_column(default=0)  # arrived after the series was complete
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(nullable=True)
    route_note: Mapped[str] = mapped_column(Text, default="")
    # The first instance's header as received, without pixel data: what routing matches on
    # (node.dicom.header). Null for series indexed before revision 0002.
    header: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # How many instances its first instance announced, and on what grounds ("30 ImagesInAcquisition,
    # acquisition 1"); empty when none did or later instances disagreed (node.ingest.completion).
    announced: Mapped[str] = mapped_column(String(64), default="")
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="series", order_by="Job.id")


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(default=0)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    times_received: Mapped[int] = mapped_column(default=1)
    series: Mapped[Series] = relationship(back_populates="instances")


# Every series a job analyses: its own, and for a study-level route every matching series of the study.
job_series = Table(
    "job_series",
    Base.metadata,
    Column("job_fk", ForeignKey("jobs.id"), primary_key=True),
    Column("series_fk", ForeignKey("series.id"), primary_key=True, index=True),
)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)  # the first of its inputs
    route: Mapped[str] = mapped_column(String(64))
    handler: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32), default="")  # pinned by the route, then what ran
    model_sha256: Mapped[str] = mapped_column(String(64), default="")
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    outputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # [OutputSpec, ...]
    companions: Mapped[dict[str, Any]] = mapped_column(default=dict)  # role → model package name
    destinations: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"names": [...]}
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    summary: Mapped[str] = mapped_column(Text, default="")
    outcome: Mapped[dict[str, Any]] = mapped_column(default=dict)  # findings, not-analysed reason
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # seconds per stage
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # The worker running or last running it: "" for the local pool; a distributed worker's name
    # (node.jobs.distributed) as it took the attempt.
    worker: Mapped[str] = mapped_column(String(128), default="")
    # How many times workers took the running attempt (node.jobs.distributed): a message delivered
    # again and again is one that kills every worker it reaches. 0 for the local pool.
    deliveries: Mapped[int] = mapped_column(default=0)
    series: Mapped[Series] = relationship(back_populates="jobs")
    inputs: Mapped[list[Series]] = relationship(secondary=job_series, order_by="Series.id")
    results: Mapped[list[Result]] = relationship(back_populates="job", order_by="Result.id")


class Worker(Base):
    """A distributed worker (``ainode worker``) as it last said: what it runs, and when it last spoke.
    The local pool's processes are not listed."""

    __tablename__ = "workers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    models: Mapped[list[str]] = mapped_column(JSON, default=list)  # ["ct-hemorrhage 1.2.0", ...]
    devices: Mapped[list[str]] = mapped_column(JSON, default=list)  # ["cpu", "gpu"]
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)  # the broker queues it consumes
    concurrency: Mapped[int] = mapped_column(default=1)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Result(Base):
    __tablename__ = "results"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_fk: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # "SC", "SR", "SEG"
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    job: Mapped[Job] = relationship(back_populates="results")
    sends: Mapped[list[Send]] = relationship(back_populates="result", order_by="Send.id")


class Send(Base):
    __tablename__ = "sends"
    id: Mapped[int] = mapped_column(primary_key=True)
    result_fk: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[SendStatus] = mapped_column(_enum(SendStatus), default=SendStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[datetime | None] = mapped_column(nullable=True)
    result: Mapped[Result] = relationship(back_populates="sends")


class AuditEvent(Base):
    """Append-only; each row's hash covers the previous row's hash (see node.audit)."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(48), index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="success")
    actor: Mapped[str] = mapped_column(String(128), default="")  # AE title, address, user or "node"
    study_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class User(Base):
    """A person who uses the dashboard or the API; ``role`` is viewer, operator or admin."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))  # argon2id, with its parameters and salt
    disabled: Mapped[bool] = mapped_column(default=False)
    failed_logins: Mapped[int] = mapped_column(default=0)  # in a row; a success resets it
    locked_until: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(nullable=True)


class WebSession(Base):
    """A logged-in browser. Only the cookie's SHA-256 is kept: the database alone opens no session."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    user: Mapped[User] = relationship()


class ApiToken(Base):
    """A bearer token for scripts and monitoring, scoped to a role; only its SHA-256 is kept."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Database:
    """An engine and its session factory. One per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        # hide_parameters: SQL errors would otherwise put bound values (patient names) in the log.
        # connect_timeout: a database host that has gone silent (not one that refuses) must not hold
        # each C-STORE's UID check for the two minutes TCP would wait.
        connect_args = {"connect_timeout": CONNECT_TIMEOUT} if url.startswith("postgresql") else {}
        self.engine: Engine = create_engine(
            url, pool_pre_ping=True, hide_parameters=True, connect_args=connect_args
        )
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed at the end, rolled back on error. Audit events recorded in it
        (node.audit.record) join the audit chain as it commits. Keep it short: file I/O, rule
        matching and hashing belong before or after it."""
        with self._sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (the web UI) never block the receiver
    cursor.execute("PRAGMA synchronous=FULL")  # a committed index row survives power loss
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def open_database(url: str) -> Database:
    """Open ``url``, creating the SQLite folder if needed, and migrate it to the newest schema."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")
    return Database(url)
