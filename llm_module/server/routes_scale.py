"""Scale-out: replicas share their adapters through one folder (``adapters_dir``, e.g. a ReadWriteMany volume).

Each folder in ``adapters_dir`` holding an adapter (``adapter_config.json``, or a ``final/``
written by llm.train) is served under the folder's name. A replica loads them all right
after its model, and reports ready (/readyz) only then. ``POST /v1/adapters/reload`` loads
the folders added since, reloads those whose weights changed (a retrained ``final/`` is a
new file: llm.train swaps it in atomically) and unloads those removed; with
``adapters_poll_s`` each replica does so by itself every N seconds, which reaches every
replica behind a Service (a POST reaches only one).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from fastapi import APIRouter, FastAPI
from starlette.concurrency import run_in_threadpool

from llm_module.adapter_files import PICKLE_WEIGHTS_FILE, WEIGHTS_FILE, adapter_folders, fingerprint
from llm_module.engine import Engine
from llm_module.errors import InvalidInput, NotReady
from llm_module.server.errors import documented
from llm_module.server.lifecycle import StartupLoad

log = logging.getLogger(__name__)


class SharedAdapters:
    """Keeps an engine's adapters in step with the folders of ``root``."""

    def __init__(self, engine: Engine, root: Path) -> None:
        self.engine = engine
        self.root = root
        self.served: dict[str, tuple | None] = {}  # name -> fingerprint, for the adapters this folder provided
        self.last_report: dict | None = None

    def sync(self) -> dict:
        with self.engine.catalog.lock:  # no on-demand load of these folders runs meanwhile
            report: dict = {"adapters_dir": str(self.root), "loaded": [], "reloaded": [], "unchanged": [],
                            "unloaded": [], "on_demand": [], "skipped": {}, "failed": {}}
            found = adapter_folders(self.root)
            listed = self.engine.list_adapters()
            live = {a["name"]: Path(a["path"]) for a in listed}
            loaded_at = {a["name"]: a["loaded_at"] for a in listed}
            for name, adapter_dir in found.items():
                self._sync_one(name, adapter_dir, live.get(name), loaded_at.get(name), report)
            # Gone from the folder: what this sync loaded, and what a request loaded on demand from it.
            root = self.root.resolve()
            from_here = {name for name, path in live.items() if root in path.resolve().parents}
            for name in sorted((set(self.served) | from_here) - set(found)):
                self.served.pop(name, None)
                if name in live:
                    self.engine.unload_adapter(name)
                    report["unloaded"].append(name)
            self.last_report = report
            return report

    def _sync_one(self, name: str, adapter_dir: Path, live_path: Path | None, loaded_at: float | None,
                  report: dict) -> None:
        current = fingerprint(adapter_dir)
        if live_path is not None and live_path.resolve() != adapter_dir.resolve():
            report["skipped"][name] = f"an adapter named {name!r} is loaded from {str(live_path)!r}; left as is"
            return
        if name not in self.served and live_path is not None and _written_before(adapter_dir, loaded_at):
            self.served[name] = current  # loaded from this folder another way (llm.train, load_adapter, restart)
        if live_path is not None and self.served.get(name) == current:
            report["unchanged"].append(name)
            return
        if live_path is None and len(self.engine.adapters.infos) >= self.engine.settings.max_loaded_adapters:
            report["on_demand"].append(name)  # past the bound: it loads when a request names it
            return
        try:
            self.engine.load_adapter(str(adapter_dir), name, replace=live_path is not None)
        except Exception as exc:  # one bad folder must not keep the others (or the replica) from serving
            report["failed"][name] = f"{type(exc).__name__}: {exc}"
            log.warning("Shared adapter %s from %s not loaded: %s", name, adapter_dir, exc)
            return
        self.served[name] = current
        report["reloaded" if live_path is not None else "loaded"].append(name)


def _written_before(adapter_dir: Path, loaded_at: float | None) -> bool:
    """Were the weights on disk written before the live copy was loaded (so it is that version)?"""
    for name in (WEIGHTS_FILE, PICKLE_WEIGHTS_FILE):
        try:
            return loaded_at is not None and (adapter_dir / name).stat().st_mtime <= loaded_at
        except OSError:
            continue
    return False


class StartupWithSharedAdapters:
    """The start-up model load, then the shared adapters; waiters and /readyz see both as one load."""

    def __init__(self, inner: StartupLoad, shared: SharedAdapters, poll_s: float) -> None:
        self.inner = inner
        self.shared = shared
        self.poll_s = poll_s
        self._done = threading.Event()
        self._done.set()

    def __getattr__(self, name: str):  # state, error, started, settings, engine: the inner load's
        return getattr(self.inner, name)

    def start(self) -> None:
        self.inner.start()
        self._done.clear()
        threading.Thread(target=self._after_model, name="llm-shared-adapters", daemon=True).start()

    def _after_model(self) -> None:
        try:
            while True:
                try:
                    self.inner.wait(60)
                    break
                except NotReady:
                    continue
            if self.shared.engine.ready:
                report = self.shared.sync()
                log.info("Shared adapters from %s: %s", self.shared.root, report)
        except Exception as exc:
            log.error("Loading the shared adapters failed: %s", exc)
        finally:
            self._done.set()
        while self.poll_s > 0:
            time.sleep(self.poll_s)
            if self.shared.engine.ready:
                try:
                    self.shared.sync()
                except Exception as exc:  # the next poll tries again
                    log.warning("Re-scanning %s failed: %s", self.shared.root, exc)

    def wait(self, timeout: float) -> None:
        started = time.monotonic()
        self.inner.wait(timeout)
        if not self._done.wait(max(0.0, timeout - (time.monotonic() - started))):
            raise NotReady("The model is loaded; the shared adapters are still loading. Retry shortly.")

    def require_loaded(self) -> None:
        self.inner.require_loaded()

    def status(self) -> dict:
        status = self.inner.status()
        if status["ready"] and not self._done.is_set():
            status.update(ready=False, startup="loading shared adapters")
        return status


def build_router(app: FastAPI) -> APIRouter:
    router = APIRouter()
    settings = app.state.settings
    folder = app.state.engine.shared_adapters_dir()
    shared = SharedAdapters(app.state.engine, folder) if folder else None
    if shared is not None:
        app.state.startup = StartupWithSharedAdapters(app.state.startup, shared, settings.adapters_poll_s)
    app.state.shared_adapters = shared

    # Documented where it works: on a server with an adapters_dir (elsewhere it answers 400, naming the setting).
    @router.post("/v1/adapters/reload", tags=["adapters"], summary="Load what changed in the shared adapters_dir",
                 description="Loads new adapter folders, reloads retrained ones, unloads removed ones; answers "
                             "what it did per name. Needs the adapters_dir setting.",
                 include_in_schema=shared is not None, responses=documented(503))
    async def reload_adapters() -> dict:
        if shared is None:
            raise InvalidInput("This server has no adapters_dir; start it with --adapters-dir (or "
                               "LLM_MODULE_ADAPTERS_DIR) to share adapters between replicas.")
        return await run_in_threadpool(_sync_when_ready, app, shared)

    return router


def _sync_when_ready(app: FastAPI, shared: SharedAdapters) -> dict:
    app.state.startup.wait(app.state.settings.ready_timeout_s)
    app.state.startup.require_loaded()
    shared.engine.ensure_ready()
    return shared.sync()
