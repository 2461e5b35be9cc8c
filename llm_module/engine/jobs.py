"""Background jobs (training runs): progress, cancel, a bounded history, and records that outlive
the process.

Each job's record (state, progress, parameters, result, error) is written atomically to
``<store>/<job id>.json`` whenever its state changes and at most every few seconds while it runs.
A new process reads them back: a job that was queued or running when the last process died is
``interrupted`` (with the last complete checkpoint its output folder holds), and ``resume`` runs it
again under the same id, from that checkpoint.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Conflict, LLMError, NotFound
from ..paths import atomic_write_text

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running", "cancelling")
RESUMABLE_STATES = ("interrupted", "failed", "cancelled")
SAVE_EVERY_S = 2.0  # progress is written at most this often while a job runs
EXIT_WAIT_S = 60.0  # at interpreter exit, how long running jobs get to stop at their next step


@dataclass
class Job:
    id: str
    kind: str
    params: dict
    state: str = "queued"  # queued, running, cancelling, done, failed, cancelled, interrupted
    progress: dict = field(default_factory=dict)
    result: Any = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    runs: int = 0  # 1 for the first run, 2 after one resume, ...
    cancel_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    saved_at: float = 0.0

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
            "runs": self.runs,
            "elapsed_s": round((self.finished or time.time()) - (self.started or self.created), 3),
        }

    @classmethod
    def from_record(cls, record: dict) -> Job:
        return cls(id=record["job_id"], kind=record["kind"], params=record.get("params") or {},
                   state=record.get("state", "interrupted"), progress=record.get("progress") or {},
                   result=record.get("result"), error=record.get("error"), created=record.get("created", 0.0),
                   started=record.get("started"), finished=record.get("finished"), runs=record.get("runs", 1))


# Every live manager, whose running jobs are stopped at interpreter exit. Why: a daemon thread still
# inside a torch op when the interpreter finalizes is ended by pthread_exit in C++ code, which aborts
# the process ("terminate called without an active exception"); stopped at a step, the job is
# recorded as interrupted with its checkpoint instead, and resumes in the next process.
_live: weakref.WeakSet[JobManager] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    for manager in list(_live):
        manager.stop_all(deadline)


class JobManager:
    """Runs callables in daemon threads; each gets a progress callback and a cancel event."""

    def __init__(self, store: Path | None = None, keep_finished: int = 100) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._keep_finished = keep_finished
        self._exiting = False
        self.store = store
        self._load()
        _live.add(self)

    # ------------------------------------------------------------------ records on disk
    def _load(self) -> None:
        if self.store is None or not self.store.is_dir():
            return
        for path in sorted(self.store.glob("*.json")):
            try:
                job = Job.from_record(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("Ignoring unreadable job record %s: %s", path, exc)
                continue
            if job.state in ACTIVE_STATES:  # its process died with it
                job.state, job.finished = "interrupted", job.finished or time.time()
                job.error = job.error or "The process running this job stopped before it ended; resume it."
                job.progress["last_checkpoint"] = last_checkpoint(job.params.get("output_dir"))
                self._save(job)
            self._jobs[job.id] = job

    def _save(self, job: Job, force: bool = True) -> None:
        if self.store is None or (not force and time.time() - job.saved_at < SAVE_EVERY_S):
            return
        job.saved_at = time.time()
        try:
            atomic_write_text(self.store / f"{job.id}.json", json.dumps(job.to_dict(), default=str))
        except OSError as exc:  # a read-only home must not stop a training run
            log.warning("Could not save job %s: %s", job.id, exc)

    # ------------------------------------------------------------------ running
    def start(self, kind: str, params: dict, work: Callable[[Callable[[dict], None], threading.Event], Any],
              job_id: str | None = None) -> Job:
        """Run ``work(report, cancel)`` as a job (``job_id``: run a resumable job again under its id)."""
        if job_id is not None:
            job = self.get(job_id)
            if job.state not in RESUMABLE_STATES:
                raise Conflict(f"Job {job_id} is {job.state}; only an interrupted, failed or cancelled job resumes.")
            job.state, job.error, job.result, job.finished = "queued", None, None, None
            job.cancel_event = threading.Event()
        else:
            job = Job(id=uuid.uuid4().hex[:12], kind=kind, params=params)
        job.runs += 1

        def report(progress: dict) -> None:
            job.progress.update(progress)
            self._save(job, force=False)

        def run() -> None:
            job.state, job.started = "running", time.time()
            self._save(job)
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
                if self._exiting and job.state == "cancelled":
                    job.state, job.result = "interrupted", None
                    job.error = "The process exited while this job ran; resume it."
                job.finished = time.time()
                job.progress["last_checkpoint"] = last_checkpoint(job.params.get("output_dir"))
                self._save(job)

        job.thread = threading.Thread(target=run, name=f"llm-job-{job.id}", daemon=True)
        with self._lock:
            self._prune()
            self._jobs[job.id] = job
        self._save(job)
        job.thread.start()
        return job

    def stop_all(self, deadline: float) -> None:
        """The process is exiting: running jobs stop at their next step (as ``interrupted``, resumable);
        each is waited for until ``deadline`` (time.monotonic)."""
        self._exiting = True
        running = self.active()
        for job in running:
            job.cancel_event.set()
        for job in running:
            if job.thread is not None:
                job.thread.join(max(0.0, deadline - time.monotonic()))

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
        self._save(job)
        return job

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created)

    def active(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.state in ACTIVE_STATES]

    def interrupted(self) -> list[Job]:
        return [j for j in self.list() if j.state == "interrupted"]

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        job = self.get(job_id)
        if job.thread is not None:
            job.thread.join(timeout)
        return job

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.state not in ACTIVE_STATES]
        for job in sorted(finished, key=lambda j: j.created)[: max(0, len(finished) - self._keep_finished)]:
            del self._jobs[job.id]
            if self.store is not None:
                (self.store / f"{job.id}.json").unlink(missing_ok=True)


def last_checkpoint(output_dir: str | None) -> str | None:
    """The newest complete checkpoint a run left in ``output_dir``, if any."""
    if not output_dir:
        return None
    from ..training.checkpoints import checkpoints, is_complete

    complete = [c for c in checkpoints(Path(output_dir)) if is_complete(c)]
    return str(complete[-1]) if complete else None
