"""GET /v1/models (from the repository manifest) and GET /v1/stats (batcher and cache counters)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.deps import BackendDep, BatcherDep, BatchersDep, require_api_key
from service.routes.inputs import AUTH_ERRORS
from service.schemas import ModelInfo, ModelsResponse

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("/models", response_model=ModelsResponse, responses=AUTH_ERRORS)
async def models(backend: BackendDep) -> ModelsResponse:
    m = backend.manifest.to_dict()
    return ModelsResponse(
        format=m["format"], flavour=m["flavour"], preset=m["preset"], checkpoint=m["checkpoint"],
        backend=backend.name, device=getattr(backend, "device", "cpu"),
        providers=getattr(backend, "providers", None), image_hw=m["image"]["hw"], max_tokens=m["max_tokens"],
        token_buckets=m["token_buckets"], top_k=m["top_k"], postprocess=m["postprocess"],
        tasks=backend.tasks, answer_vocabulary=m["answer_vocabulary"],
        caption={k: m["caption"][k] for k in ("max_len", "words", "checked_phrases", "check_threshold")}
        if m["caption"] else None,
        models=[ModelInfo(name=name, inputs=spec["inputs"], outputs=spec["outputs"])
                for name, spec in m["models"].items()],
    )


@router.get("/stats", responses=AUTH_ERRORS)
async def stats(request: Request, backend: BackendDep, batcher: BatcherDep, batchers: BatchersDep) -> dict:
    """Counters: batches formed and their sizes (per task), queue depth, prompt-cache hits/misses,
    admission (requests in progress, shed at the door)."""
    batchers = batchers or {"detect": batcher}
    out = {"batcher": batcher.stats(), "batchers": {k: b.stats() for k, b in batchers.items()},
           "backend": backend.stats()}
    admission = _admission(request.app)
    if admission is not None:
        out["admission"] = admission.stats()
    return out


def _admission(app):
    """The app's Admission (service.admission; create_app puts it on app.state)."""
    return getattr(app.state, "admission", None)
