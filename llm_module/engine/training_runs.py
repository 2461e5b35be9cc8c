"""Training runs and evaluation, for the engine: checks, paths, jobs, and the trained adapter going live.

A run trains a private float copy of the base model (training/trainer.py), in this process or as
a torchrun job of several (training/distributed.py), in the foreground or as a background job
(jobs.py); the served model is never touched until the finished adapter is loaded, which the
engine does through ``on_trained``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..adapter_files import check_name
from ..errors import Conflict
from ..loader import load_model
from ..paths import resolve_user_path
from ..runtime.memory import release_memory
from ..runtime.threads import run_in_fresh_thread
from ..settings import child_process_env
from .jobs import JobManager

PATH_KEY_SUFFIXES = ("_dir", "_path", "_file", "_folder")


class TrainingRuns:
    def __init__(self, settings, jobs: JobManager, on_trained: Callable[[dict, str], dict]) -> None:
        self.settings = settings
        self.jobs = jobs
        self.on_trained = on_trained  # (result, adapter name) -> result, once the run wrote its adapter

    def confine(self, path: Any, what: str, *, must_exist: bool) -> Path:
        return resolve_user_path(path, self.settings.data_root, must_exist=must_exist, what=what)

    def confine_path_keys(self, values: dict | None) -> dict | None:
        """Options whose names say they are paths (``eval_file``, ``logging_dir``...), confined too."""
        if not isinstance(values, dict) or self.settings.data_root is None:
            return values
        return {key: str(self.confine(value, key, must_exist=False))
                if key.endswith(PATH_KEY_SUFFIXES) and isinstance(value, str) else
                self.confine_path_keys(value) if isinstance(value, dict) else value
                for key, value in values.items()}

    def train(self, *, setup_args: dict, base_model_name: str, live_adapter_dirs: dict[str, str], data_file: str,
              output_dir: str, training_params: dict | None = None, resume_from_checkpoint: bool | str = False,
              adapter_name: str | None = None, background: bool = False, job_id: str | None = None,
              packed_base: bool = False, **kwargs: Any) -> dict:
        from ..training import check_output_dir, train_adapter
        from ..training.distributed import pop_launch_options, train_distributed
        from ..training.params import check_options, resolve_params

        # What resuming this run as a job needs: the call as it was made (paths as the caller gave them).
        call = {"data_file": data_file, "output_dir": output_dir, "training_params": training_params,
                "adapter_name": adapter_name, **kwargs}
        launch = pop_launch_options(kwargs)  # num_processes > 1 or nnodes > 1: a torchrun job, else in-process
        data_path = self.confine(data_file, "data_file", must_exist=True)
        out_path = self.confine(output_dir, "output_dir", must_exist=False)
        kwargs = self.confine_path_keys(kwargs)
        training_params = self.confine_path_keys(training_params)
        name = check_name(adapter_name or out_path.name)
        for live_name, live_path in live_adapter_dirs.items():
            live = Path(live_path).resolve()
            if out_path == live or live in out_path.parents:
                raise Conflict(
                    f"output_dir {output_dir!r} is the folder of the loaded adapter {live_name!r}; training there "
                    "would overwrite it. Pick a new output_dir (its final/ folder becomes the adapter)."
                )
        check_output_dir(out_path, resume_from_checkpoint)
        if isinstance(resume_from_checkpoint, str):
            resume_from_checkpoint = str(self.confine(resume_from_checkpoint, "resume_from_checkpoint",
                                                      must_exist=True))
        for job in self.jobs.active():
            if job.kind == "train" and job.params.get("output_dir") == str(out_path):
                raise Conflict(f"Job {job.id} is already training into {output_dir!r}; wait or cancel it.")
        params = {"data_file": str(data_path), "output_dir": str(out_path), "adapter_name": name, "call": call}
        show_progress = kwargs.pop("show_progress", not background)
        # A bad option or setting is refused now, not by a background job minutes later.
        check_options(kwargs, packed_base=packed_base)
        resolve_params(training_params)
        common = {"data_file": data_path, "output_dir": out_path, "training_params": training_params,
                  "resume_from_checkpoint": resume_from_checkpoint, "base_model_name": base_model_name,
                  "show_progress": show_progress, **kwargs}

        def work(progress, cancel) -> dict:
            if launch is not None:
                result = train_distributed(launch, setup_args=setup_args, progress=progress, cancel=cancel,
                                           env=child_process_env(self.settings), **common)
                return self.on_trained(result, name)
            loader_args = {k: v for k, v in setup_args.items() if k != "quantize"}
            fresh = load_model(**loader_args, models_dir=self.settings.models_dir)  # a private float copy
            try:
                result = train_adapter(fresh.model, fresh.tokenizer, progress=progress, cancel=cancel, **common)
            finally:
                del fresh
                release_memory()  # the copy, optimizer and activations: give them back to the OS
            return self.on_trained(result, name)

        if background:
            job = self.jobs.start("train", params, work, job_id=job_id)
            return {"job_id": job.id, "state": job.state, **params}
        return run_in_fresh_thread(work, lambda progress: None, threading.Event(), thread_name="llm-train")


    def resume(self, job_id: str, train: Any) -> dict:
        """Run an interrupted (or failed, or cancelled) training job again, from its last checkpoint;
        ``train`` is the engine's train (the model as it is served now)."""
        job = self.jobs.get(job_id)
        if job.kind != "train" or "call" not in job.params:
            raise Conflict(f"Job {job_id} is not a training job this version can resume; start a new llm.train "
                           "with resume_from_checkpoint=True instead.")
        call = {k: v for k, v in job.params["call"].items() if v is not None}
        return train(**call, resume_from_checkpoint=True, background=True, job_id=job_id)

