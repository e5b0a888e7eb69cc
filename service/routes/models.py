"""GET /v1/models (from the repository manifest) and GET /v1/stats (batcher and cache counters)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.deps import BackendDep, BatcherDep, require_api_key
from service.schemas import ModelInfo, ModelsResponse

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("/models", response_model=ModelsResponse)
async def models(backend: BackendDep) -> ModelsResponse:
    m = backend.manifest
    return ModelsResponse(
        format=m["format"], flavour=m["flavour"], preset=m["preset"], checkpoint=m.get("checkpoint", {}),
        backend=backend.name, image_hw=list(m["image"]["hw"]), max_tokens=m["max_tokens"],
        token_buckets=list(m["token_buckets"]), top_k=m["top_k"], postprocess=m.get("postprocess", {}),
        models=[ModelInfo(name=name, inputs=spec["inputs"], outputs=spec["outputs"])
                for name, spec in m["models"].items()],
    )


@router.get("/stats")
async def stats(backend: BackendDep, batcher: BatcherDep) -> dict:
    """Counters: batches formed and their sizes, queue depth, prompt-cache hits/misses."""
    return {"batcher": batcher.stats(), "backend": backend.stats()}
