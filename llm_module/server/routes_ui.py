"""The web playground (issue 9) and the few endpoints it needs beyond routes_api, open to every client.

* ``GET /`` and ``GET /ui``: redirect to ``ui/`` (relative, so a ``/t/<token>/`` prefix is kept).
* ``GET /ui/`` and ``GET /ui/<asset>``: the page, from ``server/static`` (no data in it; every API call it
  makes needs the token, which the page asks for when the API answers 401).
* ``GET /v1/files``: training data files and adapter folders under the data root.
* ``PUT /v1/files/<name>``: upload a data file (the raw body) to ``<data root>/uploads/<name>``.
* ``GET /v1/jobs/<id>/loss``: a training job's loss by step, for a live loss curve.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse

from llm_module.adapter_files import META_FILE, adapter_dir_in
from llm_module.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from llm_module.paths import resolve_user_path
from llm_module.server.errors import documented

STATIC_DIR = Path(__file__).parent / "static"
# The page loads nothing from elsewhere: no CDN, no inline script, no framing.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")
UPLOAD_DIR = "uploads"
UPLOAD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# The same rule as one pattern, for the OpenAPI schema: UPLOAD_NAME_RE, no "..", a data suffix in any case.
UPLOAD_NAME_PATTERN = (r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*"
                       r"\.([jJ][sS][oO][nN][lL]?|[cC][sS][vV]|[tT][xX][tT])$")
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"text/plain": {"schema": {
    "type": "string", "minLength": 1, "pattern": r"[^ \t\n\r\x0b\x0c]",
    "description": "The file's contents: UTF-8 text, not only white space."}}}}}
MAX_LISTED = 500  # files listed by GET /v1/files
MAX_DEPTH = 5  # folders below the data root searched by GET /v1/files
MAX_FOLDERS = 2000  # folders visited by GET /v1/files, so a huge tree still answers at once
MAX_LOSS_POINTS = 1000  # per job; older points are thinned out, keeping the curve's shape


def build_router(app: FastAPI) -> APIRouter:
    router = APIRouter()
    loss_history = LossHistory()

    @router.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("ui/")

    @router.get("/ui", include_in_schema=False)
    async def ui_without_slash() -> RedirectResponse:
        return RedirectResponse("ui/")

    @router.get("/ui/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    @router.get("/ui/{asset}", include_in_schema=False)
    async def asset(asset: str) -> FileResponse:
        if asset not in _static_assets():
            raise NotFound(f"The playground has no file {asset!r}.")
        return FileResponse(STATIC_DIR / asset, headers=PAGE_HEADERS)

    @router.get("/v1/files", tags=["files"], summary="Data files and adapter folders under the data root")
    async def list_files() -> dict:
        settings = app.state.settings
        listing = list_data_root(files_root(settings))
        return {"data_root": str(settings.data_root) if settings.data_root else None,
                "max_upload_bytes": settings.max_body_bytes, **listing}

    @router.put("/v1/files/{name}", tags=["files"], status_code=201,
                summary="Upload a data file (the raw request body) into the data root's uploads/ folder",
                description=f"The name must end in one of {', '.join(DATA_SUFFIXES)}; the body must be UTF-8 "
                            "text no larger than the server's max_body_bytes. Add ?overwrite=true to replace "
                            "an earlier upload of the same name. The file is written atomically: a failed "
                            "upload leaves no partial file.",
                openapi_extra=UPLOAD_BODY, responses=documented(400, 403, 409, 413))
    async def upload_file(request: Request,
                          # Documented, not enforced here: save_upload refuses a bad name with the rule (400).
                          name: str = PathParam(..., pattern=UPLOAD_NAME_PATTERN, maxLength=100,
                                                description="The file's name (uploads/<name> in the data root)."),
                          overwrite: bool = Query(False, description="Replace an earlier upload of this name."),
                          ) -> dict:
        settings = app.state.settings
        body = await request.body()  # BodyLimitMiddleware has refused anything over max_body_bytes already
        return save_upload(files_root(settings), settings.data_root, name, body, settings.max_body_bytes, overwrite)

    @router.get("/v1/jobs/{job_id}/loss", tags=["jobs"], summary="A training job's loss by step",
                description="While the job runs: the points seen at each poll (or the trainer's own history "
                            "when it reports one). Once the run wrote training_log.json: every logged step.",
                responses=documented(404))
    async def job_loss(job_id: str = PathParam(..., min_length=1, description="A job's id.")) -> dict:
        return loss_history.observe(app.state.engine.job_status(job_id))

    return router


def _static_assets() -> set[str]:
    return {p.name for p in STATIC_DIR.iterdir() if p.is_file()}


def files_root(settings) -> Path:
    """Where caller paths are taken from: the data root, else the working directory (as the engine does)."""
    return settings.data_root or Path.cwd()


# ------------------------------------------------------------------ listing
def list_data_root(root: Path) -> dict:
    """Training data files and adapter folders under ``root``, as paths relative to it, newest first.

    Model and adapter folders are not searched (their .json files are configs, not data);
    hidden folders and checkpoints are skipped.
    """
    data_files: list[dict] = []
    adapter_dirs: list[dict] = []
    truncated = False
    for visited, (folder, subfolders, files) in enumerate(os.walk(root)):
        if visited >= MAX_FOLDERS or len(data_files) >= MAX_LISTED:
            truncated = True
            break
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        if _is_adapter_folder(here):
            adapter_dirs.append({"path": _relative(here, root), "trained_at": _trained_at(here),
                                 "modified": here.stat().st_mtime})
            subfolders.clear()
            continue
        if (here / "config.json").is_file():  # a model folder
            subfolders.clear()
            continue
        subfolders[:] = sorted(d for d in subfolders
                               if depth < MAX_DEPTH and not d.startswith((".", "__", "checkpoint-")))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(DATA_SUFFIXES):
                continue
            if len(data_files) >= MAX_LISTED:
                truncated = True
                break
            stat = (here / name).stat()
            data_files.append({"path": _relative(here / name, root), "size_bytes": stat.st_size,
                               "modified": stat.st_mtime})
    data_files.sort(key=lambda f: f["modified"], reverse=True)
    adapter_dirs.sort(key=lambda a: a["modified"], reverse=True)
    return {"data_files": data_files, "adapter_dirs": adapter_dirs, "truncated": truncated}


def _is_adapter_folder(folder: Path) -> bool:
    """A LoRA adapter, or an llm.train run folder holding one in final/."""
    return adapter_dir_in(folder) is not None


def _trained_at(folder: Path) -> float | None:
    for meta in (folder / META_FILE, folder / "final" / META_FILE):
        try:
            return json.loads(meta.read_text(encoding="utf-8")).get("trained_at")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() or "."


# ------------------------------------------------------------------ upload
def save_upload(root: Path, data_root: Path | None, name: str, body: bytes, cap: int, overwrite: bool) -> dict:
    """Write ``body`` to ``root/uploads/name`` atomically; refuse odd names, binary data and silent overwrites."""
    if not UPLOAD_NAME_RE.match(name) or ".." in name:
        raise InvalidInput(f"Upload name {name!r} is not valid: use letters, digits, '_', '-' and '.', "
                           f"ending in one of {', '.join(DATA_SUFFIXES)}.")
    if not name.lower().endswith(DATA_SUFFIXES):
        raise InvalidInput(f"Upload {name!r} is not a training data file; the name must end in "
                           f"{', '.join(DATA_SUFFIXES)}.")
    if len(body) > cap:
        raise PayloadTooLarge(f"The upload ({len(body)} bytes) is over this server's cap of {cap} bytes; "
                              "copy larger files into the data root instead.")
    if not body.strip():
        raise InvalidInput(f"Upload {name!r} is empty; send the file's contents as the request body.")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"Upload {name!r} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    target = resolve_user_path(str(root / UPLOAD_DIR / name), data_root, must_exist=False, what="upload")
    existed = target.exists()
    if existed and not overwrite:
        raise Conflict(f"{UPLOAD_DIR}/{name} exists already; pick another name, or add ?overwrite=true.")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": _relative(target, root.resolve()), "size_bytes": len(body), "overwritten": existed}


# ------------------------------------------------------------------ loss history
class LossHistory:
    """Each job's training loss by step, for the page's live loss curve.

    The trainer reports only its latest loss in ``progress``; so the points seen at each
    poll are kept (bounded), unless the trainer reports ``progress["history"]`` itself.
    Once the run wrote ``training_log.json`` (at the end), its full per-step log is used.
    """

    def __init__(self, max_points: int = MAX_LOSS_POINTS) -> None:
        self.max_points = max_points
        self._sampled: dict[str, list[dict]] = {}

    def observe(self, job: dict) -> dict:
        job_id, progress = job["job_id"], job.get("progress") or {}
        answer = {"job_id": job_id, "state": job["state"], "eval_points": []}
        logged = self._training_log(job)
        if logged is not None:
            self._sampled.pop(job_id, None)
            return {**answer, **logged, "source": "training_log"}
        if isinstance(progress.get("history"), list):
            points = [p for p in progress["history"] if isinstance(p, dict) and p.get("loss") is not None]
            return {**answer, "points": points[-self.max_points:], "source": "progress"}
        points = self._sampled.setdefault(job_id, [])
        step, loss = progress.get("step"), progress.get("loss")
        if isinstance(step, int) and isinstance(loss, (int, float)) and (not points or step > points[-1]["step"]):
            points.append({"step": step, "loss": loss})
            if len(points) > self.max_points:
                del points[1:-1:2]  # keep the first and last, thin the middle
        return {**answer, "points": list(points), "source": "sampled"}

    @staticmethod
    def _training_log(job: dict) -> dict | None:
        if job.get("kind") != "train" or job["state"] in ("queued", "running", "cancelling"):
            return None
        output_dir = (job.get("params") or {}).get("output_dir")
        if not output_dir:
            return None
        path = Path(output_dir) / "training_log.json"
        try:
            if path.stat().st_mtime < (job.get("started") or 0):
                return None  # an earlier run's log: this one ended before writing its own
            log = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(log, dict) or log.get("result", {}).get("steps") is None:
            return None
        points = [{"step": s["step"], "loss": s["loss"]} for s in log.get("steps", []) if "loss" in s]
        evals = [{"step": e["step"], "loss": e["eval_loss"]} for e in log.get("eval", []) if "eval_loss" in e]
        return {"points": points[-MAX_LOSS_POINTS:], "eval_points": evals}
