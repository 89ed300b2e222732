"""Settings: a TOML file, overridden by environment variables, validated before anything starts.

Environment overrides use ``AINODE_<SECTION>__<KEY>`` (``AINODE_NODE__DICOM_PORT=11113``); values are
parsed as TOML literals where they parse (numbers, booleans, arrays), else taken as strings.
"""

from __future__ import annotations

import importlib
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

ENV_PREFIX = "AINODE_"
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


class ConfigError(Exception):
    """A bad setting; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ae_title(value: str) -> str:
    if not 0 < len(value) <= 16 or "\\" in value or not value.isprintable() or value.strip() != value:
        raise ValueError("an AE title is 1-16 printable characters, no backslash, no edge spaces")
    return value


AETitle = Annotated[str, AfterValidator(_ae_title)]


class NodeSettings(_Section):
    ae_title: AETitle = "AINODE"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=1, le=65535)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=1, le=65535)
    data_dir: Path = Path("./var")
    database_url: str = ""  # empty: SQLite in data_dir
    models_dir: Path = DEFAULT_MODELS_DIR
    allowed_calling_aets: list[AETitle] = []  # empty: any calling AE may store
    min_free_disk_mb: int = Field(500, ge=0)  # below this the node answers 0xA700 (out of resources)
    max_associations: int = Field(10, ge=1)
    network_timeout: float = Field(60.0, gt=0)
    workers: int = Field(1, ge=1)  # local job slots, each its own process
    torch_threads: int = Field(0, ge=0)  # 0: one per core shared by the workers
    plugins: list[str] = []  # modules imported at start that register output writers or executors

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'ainode.db').resolve()}"


class StudySettings(_Section):
    stable_seconds: float = Field(10.0, ge=0)
    single_image_modalities: list[str] = ["CR", "DX", "OP", "XC", "MG", "IO", "PX", "ES"]
    late_instances: Literal["rerun", "ignore"] = "rerun"


class JobSettings(_Section):
    executor: str = "local"  # who runs jobs: a name registered in node.jobs.executor
    max_attempts: int = Field(2, ge=1)  # a job that fails is run again up to this many times in all
    timeout_seconds: float = Field(900.0, gt=0)


class SendSettings(_Section):
    max_attempts: int = Field(8, ge=1)
    first_delay_seconds: float = Field(5.0, ge=0)
    max_delay_seconds: float = Field(900.0, ge=0)
    backoff_factor: float = Field(2.0, ge=1)


class WebSettings(_Section):
    """The dashboard's sessions and its answer to password guessing."""

    session_hours: float = Field(8.0, gt=0)  # a login lasts this long, then the user logs in again
    # Cookies only over HTTPS (a TLS proxy in front); false only for plain-HTTP tests and development.
    secure_cookies: bool = True
    lockout_after: int = Field(5, ge=1)  # failed logins in a row before the account is locked
    lockout_seconds: float = Field(60.0, ge=0)  # the first lock; each further failure doubles it ...
    lockout_max_seconds: float = Field(3600.0, ge=0)  # ... up to this


class AuditSettings(_Section):
    """The audit chain's key, and where audit messages are copied to (DICOM/IHE ATNA over syslog)."""

    key_file: Path | None = None  # None: data_dir/audit.key; keep it outside the database's backups
    syslog_host: str = ""  # empty: no forwarding
    syslog_port: int = Field(514, ge=1, le=65535)
    syslog_transport: Literal["udp", "tls"] = "udp"  # RFC 5426 datagrams, or RFC 5425 over TLS
    tls_ca_file: Path | None = None  # CA certificates the repository's is checked against; None: the system's
    tls_cert_file: Path | None = None  # the node's own certificate (PEM), for mutual authentication ...
    tls_key_file: Path | None = None  # ... and its private key, unless the certificate file holds it
    audit_source_id: str = ""  # AuditSourceID of the messages; empty: the node's AE title
    enterprise_site_id: str = ""  # AuditEnterpriseSiteID (the hospital); empty: not sent


class Destination(_Section):
    name: str
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)


class OutputSpec(_Section):
    """One output of a route: a registered writer (see node.outputs), and the series its objects form."""

    writer: str
    series_number: int | None = Field(None, ge=1, le=2**31 - 1)  # None: the writer's default
    series_description: str | None = None  # "{task}" is replaced by the task; None: the writer's


DEFAULT_OUTPUTS = (OutputSpec(writer="sc"), OutputSpec(writer="sr"))  # overlays, then the report


def _output(value: Any) -> Any:
    return {"writer": value} if isinstance(value, str) else value


class Route(_Section):
    name: str
    match: dict[str, Any] = {}
    called_ae: Any = None
    calling_ae: Any = None
    handler: str
    model: str
    model_version: str | None = None
    models: dict[str, str] = {}  # further model packages the handler uses, by role (e.g. segmentation)
    options: dict[str, Any] = {}
    outputs: list[Annotated[OutputSpec, BeforeValidator(_output)]] = list(DEFAULT_OUTPUTS)
    destinations: list[str] = []
    # "study": one job for all the study's matching series, once the whole study is quiet
    group: Literal["series", "study"] = "series"


class Settings(_Section):
    node: NodeSettings = NodeSettings()
    study: StudySettings = StudySettings()
    jobs: JobSettings = JobSettings()
    send: SendSettings = SendSettings()
    web: WebSettings = WebSettings()
    audit: AuditSettings = AuditSettings()
    destinations: list[Destination] = []
    routes: list[Route] = []

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destinations: duplicate name in {names}")
        route_names = [r.name for r in self.routes]
        if len(set(route_names)) != len(route_names):
            raise ValueError(f"routes: duplicate name in {route_names}")
        for i, route in enumerate(self.routes):
            for dest in route.destinations:
                if dest not in names:
                    raise ValueError(f"routes.{i}.destinations: unknown destination {dest!r}")
        return self

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise ConfigError(f"no destination named {name!r}; known: {[d.name for d in self.destinations]}")


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{key}: {'.'.join(path[:-1])} is not a table")
        target[path[-1]] = _parse_env_value(raw)


def _format(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"{key}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_plugins(modules: Sequence[str]) -> None:
    """Import the configured plug-in modules: importing one registers what it defines (an output
    writer, an executor) with the node, as the built-ins register themselves."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"node.plugins: cannot import {module!r}: {exc}") from exc


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (or only defaults), apply ``AINODE_*`` overrides, validate, import the plug-ins.
    Raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    _apply_env(data, os.environ if environ is None else environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from exc
    load_plugins(settings.node.plugins)
    if path is not None:
        # Relative paths in a file are relative to that file, so the node runs from any folder.
        base = Path(path).resolve().parent
        node = settings.node
        if not node.data_dir.is_absolute():
            node.data_dir = base / node.data_dir
        if not node.models_dir.is_absolute():
            node.models_dir = base / node.models_dir
        audit = settings.audit
        for name in ("key_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
            file = getattr(audit, name)
            if file is not None and not file.is_absolute():
                setattr(audit, name, base / file)
    return settings
