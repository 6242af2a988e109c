"""Pull jobs: `POST /pull` starts a background download, `/jobs` shows what pulls are doing."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from api.deps import get_runtime
from api.strict_json import StrictJSONRoute
from errors import NotFound
from runners.names import parse_model_name
from runners.quantization import QuantizeRequest
from runtime import Runtime

router = APIRouter(tags=["jobs"], route_class=StrictJSONRoute)


class PullRequest(BaseModel):
    model: str
    quantize: QuantizeRequest = "auto"
    init: bool = False  # load the model once downloaded


@router.post("/pull", status_code=202)
async def pull(body: PullRequest, runtime: Runtime = Depends(get_runtime)) -> dict[str, str]:
    ref = parse_model_name(body.model)  # 400 before touching the disk, the database or the network
    job = await runtime.jobs.submit(ref, quantize=body.quantize, init=body.init)
    return {"status": "accepted", "job_id": job.id}


@router.get("/jobs")
async def jobs(
    limit: int = Query(100, ge=1, le=1000, description="jobs per page, newest first"),
    offset: int = Query(0, ge=0, description="jobs to skip"),
    runtime: Runtime = Depends(get_runtime),
) -> dict[str, Any]:
    """One page of jobs, newest first; `total` counts every job kept (see JOB_RETENTION)."""
    page, total = await runtime.jobs.page(limit, offset)
    return {"jobs": [job.public() for job in page], "total": total, "limit": limit, "offset": offset}


@router.get("/jobs/{job_id}")
async def job(job_id: str, runtime: Runtime = Depends(get_runtime)) -> dict[str, Any]:
    found = await runtime.jobs.get(job_id)
    if found is None:
        raise NotFound(f"pull job '{job_id}' not found")
    return found.public()
