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
    IPvAnyNetwork,
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


class CallingAE(_Section):
    """A calling AE title allowed only from these addresses or networks."""

    ae_title: AETitle
    addresses: list[IPvAnyNetwork] = Field(min_length=1)


class NodeSettings(_Section):
    ae_title: AETitle = "AINODE"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=1, le=65535)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=1, le=65535)
    data_dir: Path = Path("./var")
    database_url: str = ""  # empty: SQLite in data_dir
    models_dir: Path = DEFAULT_MODELS_DIR
    # empty: any calling AE may store; an entry is a title, or {ae_title, addresses} to allow it only
    # from those addresses or networks ("10.1.2.3", "10.1.2.0/24")
    allowed_calling_aets: list[AETitle | CallingAE] = []
    min_free_disk_mb: int = Field(500, ge=0)  # below this the node answers 0xA700 (out of resources)
    reconcile_seconds: float = Field(300.0, gt=0)  # how often the spool is checked for unindexed files
    max_instance_mb: int = Field(2048, ge=1)  # a larger data set is refused with 0xC002 (too large)
    max_inflated_mb: int = Field(1024, ge=1)  # a deflated data set inflating beyond this: 0xC002 too
    max_upload_mb: int = Field(4096, ge=1)  # one POST /api/studies upload, all its files together
    max_associations: int = Field(10, ge=1)  # connections at once in any state; more: refused, no thread
    max_associations_per_address: int = Field(5, ge=1)  # of those, from one remote address
    # Listener processes on the DICOM port(s). 1: the listener runs in the node's process. N > 1: N
    # processes accept from the same sockets, so several senders at once use several cores
    # (node.ingest.receivers); each costs ~100 MB and a database connection.
    receivers: int = Field(1, ge=1, le=64)
    association_setup_seconds: float = Field(10.0, gt=0)  # connect to A-ASSOCIATE-RQ received, at most
    pdu_seconds: float = Field(30.0, gt=0)  # each PDU must arrive whole within this of its first byte
    max_pdu_bytes: int = Field(1_048_576, ge=16_384, le=2**32 - 1)  # announced to senders; longer: aborted
    refusal_audit_seconds: float = Field(60.0, gt=0)  # refusals audited/logged once per source per this
    unknown_sop_classes: Literal["accept", "refuse"] = "accept"  # storage SOP classes pynetdicom lacks
    network_timeout: float = Field(60.0, gt=0)
    workers: int = Field(1, ge=1)  # local job slots, each its own process
    torch_threads: int = Field(0, ge=0)  # 0: the cores but one, shared by the workers
    plugins: list[str] = []  # modules imported at start that register output writers or executors

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'ainode.db').resolve()}"


class StudySettings(_Section):
    stable_seconds: float = Field(10.0, ge=0)
    single_image_modalities: list[str] = ["CR", "DX", "OP", "XC", "DMS", "MG", "IO", "PX", "ES"]
    late_instances: Literal["rerun", "ignore"] = "rerun"
    # Calling AE titles that send whole series in one association (a PACS forwarding, e.g. "ORTHANC"):
    # when such an association is released, what it sent is complete at once (node.ingest.completion).
    forwarders: list[AETitle] = []


class DistributedSettings(_Section):
    """``[jobs.distributed]``: the Celery executor (``[jobs] executor = "celery"``) and its workers
    (``ainode worker``). The node and every worker read the same table; see the README's "Distributed
    workers"."""

    # The broker: RabbitMQ (durable queues, acknowledged after the outcome is recorded), or Redis
    # ("redis://127.0.0.1:6379/0"; a message unacknowledged for visibility_seconds is delivered again).
    # "amqps://" / "rediss://" for TLS.
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    visibility_seconds: float = Field(3600.0, gt=0)  # Redis only: longer than the longest job
    # How workers reach the node's internal endpoints (files in, results out): "https://" off one host.
    node_url: str = "http://127.0.0.1:8080"
    # Shared by the node and its workers (Authorization: Bearer); empty: the internal endpoints are off.
    # Prefer secret_file (or AINODE_JOBS__DISTRIBUTED__SECRET) to writing it here.
    secret: str = ""
    secret_file: Path | None = None
    ca_file: Path | None = None  # a worker verifies the node's HTTPS certificate against this
    # True: workers read the claimed files where the node's spool has them and write results there (one
    # file system shared by all); False: over HTTP.
    shared_spool: bool = False
    max_in_flight: int = Field(64, ge=1)  # jobs handed to the broker and not yet ended, at most
    heartbeat_seconds: float = Field(10.0, gt=0)  # how often a worker says it is alive
    # Workers may take one attempt of a job this many times: each time more was a worker that died
    # running it (the broker delivers the message again). Past it the attempt fails as "crashed" and is
    # retried under max_attempts, like a job that crashes a process of the local pool.
    max_deliveries: int = Field(3, ge=1)
    worker_name: str = ""  # empty: ainode@<host name>
    # Devices a worker serves: "cpu", "gpu"; empty: cpu, and gpu where torch sees CUDA. A job is sent to
    # the model's ".gpu" queue when prefer_gpu and a live worker serves it there.
    devices: list[Literal["cpu", "gpu"]] = []
    prefer_gpu: bool = True

    def resolved_secret(self) -> str:
        if self.secret_file is not None:
            return self.secret_file.read_text().strip()
        return self.secret


class JobSettings(_Section):
    executor: str = "local"  # who runs jobs: a name registered in node.jobs.executor
    max_attempts: int = Field(2, ge=1)  # a job that fails is run again up to this many times in all
    # A job's time limit: base + per instance + per MB of its series, capped at timeout_seconds.
    timeout_base_seconds: float = Field(120.0, gt=0)  # starting a worker, loading the model
    timeout_per_instance_seconds: float = Field(1.0, ge=0)  # reading and analysing one image
    timeout_per_mb_seconds: float = Field(0.5, ge=0)  # large pixel data: multi-frame, big radiographs
    timeout_seconds: float = Field(900.0, gt=0)  # the cap: no job runs longer
    # A job that ran out of time is retried only while its attempts are below this (1: never).
    timeout_max_attempts: int = Field(1, ge=1)
    watchdog_grace_seconds: float = Field(60.0, gt=0)  # past its limit + this, a running job is failed
    # Images per forward pass in a worker: a CT's slices go through in passes of this many. Larger keeps
    # more cores busy and costs memory (activations grow with it); 16 suits CPU workers of 2-8 cores.
    batch_images: int = Field(16, ge=1)
    # "when_faster": a torch package ONNX Runtime can run alike (no gradients needed: a segmentation model
    # or a CAM fast-path head) is exported once to data_dir/runtimes and timed both ways while a worker is
    # idle; the faster runs its later jobs (logged). "never": every package under its own framework.
    onnx_runtime: Literal["when_faster", "never"] = "when_faster"
    distributed: DistributedSettings = DistributedSettings()  # only for executor = "celery"


class SendSettings(_Section):
    max_attempts: int = Field(8, ge=1)
    first_delay_seconds: float = Field(5.0, ge=0)
    max_delay_seconds: float = Field(900.0, ge=0)
    backoff_factor: float = Field(2.0, ge=1)


class WebSettings(_Section):
    """The dashboard's sessions and its answer to password guessing."""

    session_hours: float = Field(8.0, gt=0)  # a login lasts this long, then the user logs in again
    # Cookies only over HTTPS ([tls] cert_file, or a TLS proxy in front); false only for plain-HTTP tests
    # and development.
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


class RetentionSettings(_Section):
    """When settled studies are removed to make room (node/retention.py): by age, and by disk use."""

    keep_days: float = Field(0.0, ge=0)  # remove settled studies last received longer ago; 0: keep forever
    disk_high_water_percent: float = Field(90.0, gt=0, le=100)  # data disk used above this: remove ...
    disk_low_water_percent: float = Field(80.0, ge=0, le=100)  # ... oldest settled studies until below this
    interval_seconds: float = Field(60.0, gt=0)  # how often the retention pass runs

    @model_validator(mode="after")
    def _check_water(self) -> RetentionSettings:
        if self.disk_low_water_percent >= self.disk_high_water_percent:
            raise ValueError("disk_low_water_percent must be below disk_high_water_percent")
        return self


class WorklistSettings(_Section):
    """A DICOM Modality Worklist the upload and capture pages pick patients from (C-FIND SCU,
    node/dicom/worklist.py); no host: the operator types the patient's details."""

    host: str = ""  # empty: no worklist
    port: int = Field(104, ge=1, le=65535)
    ae_title: AETitle = "WORKLIST"  # the worklist server's AE title
    tls: bool = False  # DICOM TLS to it, with the [tls] section's certificates
    timeout_seconds: float = Field(10.0, gt=0)  # the whole query, connection to last answer
    max_entries: int = Field(200, ge=1)  # answers beyond this are cancelled (C-CANCEL)


class CaptureSettings(_Section):
    """The camera page's frame guides: the conjunctiva's in fractions of the largest 4:3 box centred in
    the camera's picture (all of it for a 4:3 camera; x right, y down), so that an upright phone's
    3:4 picture does not stretch it; the skin circle's radius of the picture's shorter side."""

    # The conjunctiva's frame, as the prototype drew it for a pulled-down lower eyelid: a closed
    # outline of cubic Bezier segments, 3n + 1 points, the last equal to the first.
    conjunctiva_frame: list[tuple[float, float]] = [
        (0.18, 0.42),
        (0.34, 0.36),
        (0.66, 0.36),
        (0.82, 0.42),
        (0.74, 0.66),
        (0.26, 0.66),
        (0.18, 0.42),
    ]
    skin_circle_radius: float = Field(0.3, gt=0, le=0.5)  # of the picture's shorter side

    @model_validator(mode="after")
    def _check_frame(self) -> CaptureSettings:
        points = self.conjunctiva_frame
        if len(points) < 4 or (len(points) - 1) % 3 or points[0] != points[-1]:
            raise ValueError("conjunctiva_frame: 3n + 1 points (n >= 1), the last equal to the first")
        if not all(0 <= x <= 1 and 0 <= y <= 1 for x, y in points):
            raise ValueError("conjunctiva_frame: each point's x and y between 0 and 1")
        return self


class TlsSettings(_Section):
    """The node's own certificate, for DICOM TLS (node/dicom/tls.py) and the dashboard's HTTPS, and the
    CAs that certificates shown to the node are checked against."""

    cert_file: Path | None = None  # the node's certificate (PEM, its chain after it); set: HTTPS, DICOM TLS
    key_file: Path | None = None  # its private key (PEM, unencrypted), readable only by the node's user
    ca_file: Path | None = None  # CAs for senders' and destinations' certificates; None: the system's
    dicom_port: int = Field(0, ge=0, le=65535)  # the DICOM TLS listener; 0: none (2762 is DICOM TLS's port)
    dicom_host: str = ""  # where the DICOM TLS listener binds; empty: node.dicom_host
    require_client_cert: bool = False  # TLS senders must show a certificate that ca_file vouches for


class Destination(_Section):
    name: str
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False  # DICOM TLS to this destination (give its TLS port)
    tls_ca_file: Path | None = None  # CAs its certificate must come from; None: [tls] ca_file, else system's
    tls_cert_file: Path | None = None  # the certificate the node shows it; None: [tls] cert_file, if any
    tls_key_file: Path | None = None  # that certificate's private key; None: [tls] key_file
    tls_server_name: str = ""  # the name its certificate must carry; empty: host


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
    tls: TlsSettings = TlsSettings()
    retention: RetentionSettings = RetentionSettings()
    worklist: WorklistSettings = WorklistSettings()
    capture: CaptureSettings = CaptureSettings()
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
        distributed = settings.jobs.distributed
        for name in ("secret_file", "ca_file"):
            file = getattr(distributed, name)
            if file is not None and not file.is_absolute():
                setattr(distributed, name, base / file)
        audit = settings.audit
        for name in ("key_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
            file = getattr(audit, name)
            if file is not None and not file.is_absolute():
                setattr(audit, name, base / file)
        for section, names in (
            (settings.tls, ("cert_file", "key_file", "ca_file")),
            *((dest, ("tls_ca_file", "tls_cert_file", "tls_key_file")) for dest in settings.destinations),
        ):
            for name in names:
                file = getattr(section, name)
                if file is not None and not file.is_absolute():
                    setattr(section, name, base / file)
    return settings
