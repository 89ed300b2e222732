"""The node's internal endpoints for distributed workers (:mod:`node.jobs.worker`): a worker takes an
attempt, fetches the claimed files, uploads the result files, and records the outcome; and it says it
is alive. Authenticated by the shared secret of ``[jobs.distributed]`` (``Authorization: Bearer``);
without one they answer 404. Off one host, serve them over TLS (``[tls]``) and give workers its CA.

Every call names the attempt: a call for an attempt the job no longer runs answers 409, and the
worker drops the job (a message delivered again after its attempt was decided).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from node.config import Settings
from node.db import Database
from node.jobs.distributed import needs, output_from_json, record_worker, safe_name, spec_to_json
from node.jobs.store import JobFailed, JobStore
from node.spool import Spool, write_atomic

log = logging.getLogger(__name__)

# Out of the OpenAPI listing: not an API for people or scripts (tests/test_distributed.py checks their
# authentication).
router = APIRouter(prefix="/internal", include_in_schema=False)
STALE = "the job is not running this attempt"
KINDS = ("error", "crashed", "timeout", "model_refused", "model_missing", "lost")


def _worker_auth(request: Request) -> None:
    settings: Settings = request.app.state.settings
    secret = settings.jobs.distributed.resolved_secret()
    if not secret:
        raise HTTPException(404)
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), secret.encode()):
        raise HTTPException(401, "a worker's secret is needed", headers={"WWW-Authenticate": "Bearer"})


Worker = Annotated[None, Depends(_worker_auth)]


def _store(request: Request) -> JobStore:
    settings: Settings = request.app.state.settings
    db: Database = request.app.state.db
    return JobStore(db, settings.jobs)


def _stale() -> JSONResponse:
    return JSONResponse({"detail": STALE}, status_code=409)


def _ended(request: Request) -> None:
    """Wake the node's dispatcher and sender, where a node runs with the app (create_app's
    ``job_ended``)."""
    ended: Callable[[], None] | None = request.app.state.job_ended
    if ended is not None:
        try:
            ended()
        except Exception:
            log.exception("waking the node after a worker's outcome failed")


@router.post("/workers/{name}/heartbeat")
async def heartbeat(
    request: Request, name: str, _: Worker, info: Annotated[dict[str, Any], Body()]
) -> Response:
    await run_in_threadpool(record_worker, request.app.state.db, name[:128], info)
    return Response(status_code=204)


@router.get("/needs")
async def needed(request: Request, _: Worker) -> Response:
    """The package sets of the node's routes with companion models: a worker consumes the queue of
    each one it holds whole (node.jobs.distributed.needs)."""
    settings: Settings = request.app.state.settings
    return JSONResponse(
        [
            {"model": need.model, "version": need.version, "companions": list(need.companions)}
            for need in needs(settings.routes)
        ]
    )


@router.post("/jobs/{job_id}/take")
async def take(request: Request, job_id: int, _: Worker, body: Annotated[dict[str, Any], Body()]) -> Response:
    """A worker takes ``attempt``: the job's spec, how many files to fetch, and (for a shared spool)
    where they lie and where the results go."""
    attempt, worker = int(body["attempt"]), str(body.get("worker", ""))
    claim = await run_in_threadpool(_store(request).take, job_id, attempt, worker)
    if claim is None:
        return _stale()
    answer: dict[str, Any] = {
        "spec": spec_to_json(claim.spec),
        "files": len(claim.files),
        "time_limit": claim.time_limit,
    }
    settings: Settings = request.app.state.settings
    if settings.jobs.distributed.shared_spool:
        spool: Spool = request.app.state.spool
        answer["paths"] = claim.files
        answer["result_dir"] = str(spool.result_dir(job_id))
    return JSONResponse(answer)


@router.get("/jobs/{job_id}/files/{index}")
async def file(request: Request, job_id: int, index: int, attempt: int, _: Worker) -> Response:
    files = await run_in_threadpool(_store(request).files, job_id, attempt)
    if files is None:
        return _stale()
    if not 0 <= index < len(files):
        raise HTTPException(404, f"the job has {len(files)} files")
    return FileResponse(files[index], media_type="application/dicom")


@router.put("/jobs/{job_id}/results/{name}")
async def result(request: Request, job_id: int, name: str, attempt: int, _: Worker) -> Response:
    """One result file, into the job's result folder in the spool."""
    try:
        name = safe_name(name)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    if await run_in_threadpool(_store(request).files, job_id, attempt) is None:
        return _stale()
    data = await request.body()
    spool: Spool = request.app.state.spool
    target = spool.result_dir(job_id) / name
    await run_in_threadpool(_write, target, data)
    return Response(status_code=204)


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data)


@router.post("/jobs/{job_id}/finish")
async def finish(
    request: Request,
    job_id: int,
    attempt: int,
    _: Worker,
    output: Annotated[dict[str, Any], Body()],
    worker: str = "",
) -> Response:
    """Record the outcome ``worker`` computed; its result files must have been uploaded (or, with a
    shared spool, written into the result folder)."""
    spool: Spool = request.app.state.spool
    result_dir = spool.result_dir(job_id)
    try:
        parsed = output_from_json(output, result_dir)
    except (KeyError, TypeError, ValueError) as exc:
        raise HTTPException(400, f"not a job output: {exc}") from None
    missing = [Path(r.path).name for r in parsed.results if not Path(r.path).is_file()]
    if missing:
        raise HTTPException(400, f"result files not uploaded: {missing}")
    recorded = await run_in_threadpool(_store(request).finish, job_id, parsed, attempt, worker or None)
    if not recorded:
        return _stale()
    _ended(request)
    return JSONResponse({"recorded": True})


@router.post("/jobs/{job_id}/fail")
async def fail(
    request: Request,
    job_id: int,
    attempt: int,
    _: Worker,
    body: Annotated[dict[str, Any], Body()],
    worker: str = "",
) -> Response:
    kind = str(body.get("kind", "error"))
    if kind not in KINDS:
        kind = "error"
    store = _store(request)
    if await run_in_threadpool(store.files, job_id, attempt) is None:
        return _stale()
    retry = await run_in_threadpool(
        store.fail, job_id, JobFailed(kind, str(body.get("message", ""))), attempt, worker or None
    )
    _ended(request)
    return JSONResponse({"retry": retry})
