"""Background jobs (training runs) with progress, cancel and a bounded history."""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import Conflict, LLMError, NotFound

ACTIVE_STATES = ("queued", "running", "cancelling")


@dataclass
class Job:
    id: str
    kind: str
    params: dict
    state: str = "queued"  # queued, running, cancelling, done, failed, cancelled
    progress: dict = field(default_factory=dict)
    result: Any = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def to_dict(self) -> dict:
        return {
            "job_id": self.id,
            "kind": self.kind,
            "state": self.state,
            "params": self.params,
            "progress": dict(self.progress),
            "result": self.result,
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "elapsed_s": round((self.finished or time.time()) - (self.started or self.created), 3),
        }


class JobManager:
    """Runs callables in daemon threads; each gets a progress callback and a cancel event."""

    def __init__(self, keep_finished: int = 100) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._keep_finished = keep_finished

    def start(self, kind: str, params: dict, work: Callable[[Callable[[dict], None], threading.Event], Any]) -> Job:
        job = Job(id=uuid.uuid4().hex[:12], kind=kind, params=params)

        def report(progress: dict) -> None:
            job.progress.update(progress)

        def run() -> None:
            job.state, job.started = "running", time.time()
            try:
                job.result = work(report, job.cancel_event)
                job.state = "cancelled" if job.cancel_event.is_set() else "done"
            except LLMError as exc:
                job.error, job.state = str(exc), "cancelled" if job.cancel_event.is_set() else "failed"
            except Exception as exc:  # a job must never take the process down
                job.error = f"{type(exc).__name__}: {exc}"
                job.progress["traceback"] = traceback.format_exc(limit=5)
                job.state = "cancelled" if job.cancel_event.is_set() else "failed"
            finally:
                job.finished = time.time()

        job.thread = threading.Thread(target=run, name=f"llm-job-{job.id}", daemon=True)
        with self._lock:
            self._prune()
            self._jobs[job.id] = job
        job.thread.start()
        return job

    def get(self, job_id: str) -> Job:
        if not isinstance(job_id, str) or job_id not in self._jobs:
            known = ", ".join(list(self._jobs)[-5:]) or "none"
            raise NotFound(f"No job with id {job_id!r}; list_jobs() shows the known ones (latest: {known}).")
        return self._jobs[job_id]

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state not in ACTIVE_STATES:
            raise Conflict(f"Job {job_id} already ended ({job.state}); there is nothing to cancel.")
        job.cancel_event.set()
        job.state = "cancelling"
        return job

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created)

    def active(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.state in ACTIVE_STATES]

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        job = self.get(job_id)
        if job.thread is not None:
            job.thread.join(timeout)
        return job

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.state not in ACTIVE_STATES]
        for job in sorted(finished, key=lambda j: j.created)[: max(0, len(finished) - self._keep_finished)]:
            del self._jobs[job.id]
