"""Start-up model load in the background, so /healthz answers at once and /readyz flips when loaded."""

from __future__ import annotations

import logging
import threading
import time

from llm_module.engine import Engine
from llm_module.errors import NotReady
from llm_module.settings import Settings

log = logging.getLogger(__name__)


class StartupLoad:
    """Runs the configured ``engine.setup`` once in a thread; callers can wait for it."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.state = "idle"  # idle (nothing to load), loading, loaded, failed
        self.error: str | None = None
        self.started: float | None = None
        self._done = threading.Event()
        self._done.set()

    def start(self) -> None:
        if not self.settings.preload:
            return
        self.state, self.started = "loading", time.time()
        self._done.clear()
        threading.Thread(target=self._load, name="llm-startup-load", daemon=True).start()

    def _load(self) -> None:
        s = self.settings
        try:
            # reload_remembered: a restarted server serves the adapters it served before.
            self.engine.setup(s.model, adapters=dict(s.adapters) or None, device=s.device, dtype=s.dtype,
                              reload_remembered=True)
            self.state = "loaded"
            log.info("Model loaded: %s", self.engine.describe().get("model"))
            self._resume_interrupted_jobs()
        except Exception as exc:  # reported by /readyz and by every action until a setup succeeds
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("Start-up model load failed: %s", self.error)
        finally:
            self._done.set()

    def _resume_interrupted_jobs(self) -> None:
        """Training jobs the last process left running: resumed with the resume_interrupted_jobs setting."""
        for job in self.engine.jobs.interrupted():
            if not self.settings.resume_interrupted_jobs:
                log.info("Job %s was interrupted (last checkpoint %s); POST /v1/jobs/%s/resume continues it", job.id,
                         job.progress.get("last_checkpoint"), job.id)
                continue
            try:
                self.engine.resume_job(job.id)
                log.info("Resumed interrupted job %s from %s", job.id, job.progress.get("last_checkpoint"))
            except Exception as exc:  # one bad record must not keep the server from serving
                log.warning("Could not resume job %s: %s", job.id, exc)

    def wait(self, timeout: float) -> None:
        """Block until the start-up load is over; NotReady if it is still running after ``timeout``."""
        if not self._done.wait(timeout):
            waited = time.time() - (self.started or time.time())
            raise NotReady(f"The model is still loading ({waited:.0f} s so far); retry shortly or poll /readyz.")

    def require_loaded(self) -> None:
        """NotReady while the start-up load failed and nothing else got loaded since."""
        if self.state == "failed" and not self.engine.ready:
            raise NotReady(f"The start-up model load failed ({self.error}); fix the server settings "
                           "or call setup with a model that loads.")

    def status(self) -> dict:
        return {"ready": self.engine.ready, "startup": self.state, "error": self.error}
