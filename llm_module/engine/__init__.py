"""The engine: one base model, named LoRA adapters, the serving core, training jobs, data tools.

Every entry (the Jaseci actions, the HTTP service, the CLI, the playground) is a thin layer over
an ``Engine`` it is given. The engine is a facade: each concern lives in a collaborator that can
be used and tested alone, and the engine only wires them together:

* ``host`` (model_host.py): the served base model: load, install, describe;
* ``adapters`` (adapter_registry.py, adapter_files.py): named LoRA adapters on it;
* ``catalog`` (model_catalog.py): what a request may name as its model, adapters loaded on first use;
* ``serving`` (serving/): every generation, as rows of one continuously batched loop, which also
  runs every other piece of work on the served model (adapter changes, evaluation, a model swap)
  between its steps;
* ``training`` (training_runs.py, jobs.py): training runs on private copies, as jobs;
* ``data`` (data_tools.py): augmentation and active learning;
* ``state`` (state.py): what a new process restores.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from ..adapter_files import check_name, find_adapter_dir, name_for
from ..errors import Conflict, InvalidInput, LLMError, ModelLoadError
from ..paths import resolve_user_path
from ..runtime.memory import set_heap_policy
from ..runtime.threads import release_openmp_team, run_in_fresh_thread
from ..serving import ServingCore
from ..serving.constraints import StructuredOutput
from ..settings import Settings
from .adapter_registry import AdapterRegistry
from .data_tools import DataTools
from .jobs import JobManager
from .model_catalog import ModelCatalog
from .model_host import ModelHost, StagedModel
from .state import SavedState, StateFile
from .training_runs import TrainingRuns

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, settings: Settings | None = None, *, state_file: StateFile | None = None) -> None:
        self.settings = settings or Settings()
        set_heap_policy()  # a forward's activations reuse heap pages instead of faulting in new ones
        self.state_file = state_file or StateFile(self.settings.home / "state.json")
        self.host = ModelHost(self.settings)
        self.adapters = AdapterRegistry(allow_pickle=self.settings.allow_pickle_adapters)
        structured = StructuredOutput(lambda: self.host.tokenizer)
        self.serving = ServingCore(self.host, self.adapters, self.settings, constraint_factory=structured.compile)
        self.jobs = JobManager(self.settings.home / "jobs")
        self.training = TrainingRuns(self.settings, self.jobs, self._load_trained)
        self.data = DataTools(self.settings, self.serving, self._confine)
        self.catalog = ModelCatalog(self.settings, self.host, self.adapters, load=self.load_adapter,
                                    unload=self.unload_adapter, in_use=self.serving.scheduler.adapters_in_use)
        self._setup_lock = threading.Lock()

    # ================================================================== the model
    @property
    def ready(self) -> bool:
        return self.host.ready

    @property
    def tokenizer(self):
        self.ensure_ready()
        return self.host.tokenizer

    def setup(self, model_name: str | None = None, lora_dir: str | None = None, tokenizer_name: str | None = None,
              *, tokenizer_kwargs: dict | None = None, model_kwargs: dict | None = None, device: str = "auto",
              dtype: str = "auto", quantize: str | None = None, adapters: dict[str, str] | None = None,
              restore: bool = False, reload_remembered: bool = False) -> dict:
        """Load (or replace) the base model, then the given adapters.

        ``restore``: reload the last setup (model and adapters) when nothing is given.
        ``reload_remembered``: also reload the adapters remembered for this same model.
        """
        if restore:
            saved = self.state_file.read()
            if saved and saved.setup:
                log.info("Restoring the last setup: %s", saved.setup)
                try:
                    live = {n: p for n, p in saved.adapters.items() if Path(p).exists()}
                    return self._load(saved.setup, live, saved.default_adapter, skip=set(live))
                except LLMError as exc:
                    raise ModelLoadError(
                        f"The last setup ({saved.setup.get('model_name') or 'default model'}, remembered in "
                        f"{self.state_file.path}) could not be restored: {exc} Call llm.setup(model_name=...) "
                        "to choose a model (model_name='default' for the bundled one)."
                    ) from exc
        args = self.host.check_args({
            "model_name": model_name, "tokenizer_name": tokenizer_name, "tokenizer_kwargs": tokenizer_kwargs,
            "model_kwargs": model_kwargs, "device": device, "dtype": dtype, "quantize": quantize})
        if adapters is not None and not isinstance(adapters, dict):
            raise InvalidInput(f"adapters must be an object {{name: path}}, got {adapters!r}.")
        if lora_dir is not None and not isinstance(lora_dir, str):
            raise InvalidInput(f"lora_dir must be a path string, got {lora_dir!r}.")
        paths, default = dict(adapters or {}), None
        if lora_dir:
            default = name_for(Path(lora_dir))
            paths[default] = lora_dir
        saved = self.state_file.read() if reload_remembered else None
        if saved and saved.setup.get("model_name") == args["model_name"]:
            remembered = {n: p for n, p in saved.adapters.items() if n not in paths and Path(p).exists()}
            default = default or saved.default_adapter
            return self._load(args, {**paths, **remembered}, default, skip=set(remembered))
        return self._load(args, paths, default)

    def _load(self, args: dict, adapter_paths: dict, default: str | None, skip: set[str] = frozenset()) -> dict:
        """Load a model and its adapters beside the served one, then swap; a failing adapter named in
        ``skip`` (remembered, not asked for) is logged and left out."""
        if not self._setup_lock.acquire(blocking=False):
            raise Conflict("Another setup is running; wait for it to finish, then call setup again.")
        try:
            start = time.perf_counter()
            staged, registry = run_in_fresh_thread(self._stage, args, adapter_paths, default, skip)
            self.serving.call(lambda: self._install(staged, registry), drain=True)
            self._save_state()
            return self.describe(seconds=round(time.perf_counter() - start, 3))
        finally:
            self._setup_lock.release()

    def _stage(self, args: dict, adapter_paths: dict, default: str | None, skip: set[str]):
        staged = self.host.stage(args)
        registry = AdapterRegistry(allow_pickle=self.settings.allow_pickle_adapters)
        for name, path in adapter_paths.items():
            try:
                adapter_dir = find_adapter_dir(self._confine(path, f"adapter {name!r}", must_exist=False))
                registry.attach(staged.loaded.model, adapter_dir, check_name(name))
            except Exception as exc:
                if name not in skip:
                    raise
                log.warning("Skipping adapter %s from %s: %s", name, path, exc)
        if default in registry.infos:
            registry.set_default(default)
        return staged, registry

    def _install(self, staged: StagedModel, registry: AdapterRegistry) -> None:
        self.host.install(staged)
        self.adapters.adopt(registry)

    def ensure_ready(self) -> None:
        """Load the default model (or the last setup) when nothing is loaded yet."""
        if not self.ready:
            self.setup(restore=True)

    def describe(self, **extra: Any) -> dict:
        if not self.ready:
            return {"ready": False, "model": None, "adapters": [], **extra}
        return {**self.host.describe(), "adapters": self.adapters.names(), "default_adapter": self.adapters.default,
                **extra}

    def _save_state(self) -> None:
        self.state_file.write(SavedState(
            setup={k: v for k, v in self.host.args.items() if v is not None},
            adapters={n: i.path for n, i in self.adapters.infos.items()},
            default_adapter=self.adapters.default,
        ))

    def _confine(self, path: Any, what: str, must_exist: bool) -> Path:
        return resolve_user_path(path, self.settings.data_root, must_exist=must_exist, what=what)

    # ================================================================== adapters
    def load_adapter(self, path: str, name: str | None = None, *, replace: bool = False,
                     make_default: bool = False) -> dict:
        self.ensure_ready()
        resolved = self._confine(path, "adapter path", must_exist=False)
        adapter_dir = find_adapter_dir(resolved)
        name = check_name(name if name is not None else name_for(resolved))
        start = time.perf_counter()
        info = self.serving.call(lambda: self.adapters.attach(self.host.model, adapter_dir, name, replace=replace,
                                                              make_default=make_default))
        self._save_state()
        return {**info.to_dict(), "seconds": round(time.perf_counter() - start, 4)}

    def unload_adapter(self, name: str) -> dict:
        self.ensure_ready()
        info = self.serving.call(lambda: self.adapters.detach(name))
        self._save_state()
        return {"unloaded": name, "path": info.path, "adapters": self.adapters.names()}

    def list_adapters(self) -> list[dict]:
        return self.adapters.listing()

    def set_default_adapter(self, name: str | None) -> dict:
        self.ensure_ready()
        self.adapters.set_default(name)
        self._save_state()
        return {"default_adapter": name}

    def adapter_for_model(self, model: Any) -> str:
        """The adapter an OpenAI-style ``model`` names ("base" for the base model); see model_catalog.py."""
        self.ensure_ready()
        return self.catalog.adapter_for(model)

    def model_cards(self) -> list[dict]:
        self.ensure_ready()
        return self.catalog.cards()

    def shared_adapters_dir(self) -> Path | None:
        return self.catalog.shared_dir()

    # ================================================================== generation
    def generate(self, prompt: str | list[str] | None = None, **kwargs: Any) -> list:
        """``[{"generated_text": ...}]`` for one prompt; one such list per prompt for a list."""
        self._enter()
        return self.serving.generate(prompt, **kwargs)

    def stream(self, prompt: str | None = None, **kwargs: Any):
        """The completion of one prompt, piece by piece (validated before the first piece)."""
        self._enter()
        return self.serving.stream(prompt, **kwargs)

    def start(self, prompt: Any = None, *, stream: bool = False, **kwargs: Any):
        """(call, handle) of a generate call running in the batch: for entries that need more than the
        text (the OpenAI routes: token counts, log-probabilities, finish reasons, events)."""
        self._enter()
        call = self.serving.build(prompt, **kwargs)
        if call.num_beams > 1:
            raise InvalidInput("num_beams is not available here; use llm.generate for beam search.")
        return call, self.serving.start(call, stream=stream)

    def _enter(self) -> None:
        """Every generation entry: the model is loaded, and this caller's thread holds no idle OpenMP
        team that would slow the model's thread (runtime/threads.py)."""
        self.ensure_ready()
        release_openmp_team()

    # ================================================================== training and evaluation
    def train(self, data_file: str, output_dir: str, training_params: dict | None = None,
              resume_from_checkpoint: bool | str = False, **kwargs: Any) -> dict:
        from ..runtime.quantize import has_packed_weights

        self.ensure_ready()
        return self.training.train(setup_args=self.host.args, base_model_name=self.host.loaded.name,
                                   live_adapter_dirs={n: i.path for n, i in self.adapters.infos.items()},
                                   packed_base=has_packed_weights(self.host.loaded.model),
                                   data_file=data_file, output_dir=output_dir, training_params=training_params,
                                   resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_trained(self, result: dict, name: str) -> dict:
        """Make a finished run's adapter live (a node other than 0 of a multi-node run wrote none)."""
        if not result.get("cancelled") and result.get("adapter_dir"):
            result["adapter"] = self.load_adapter(result["adapter_dir"], name, replace=True)["name"]
        return result

    def evaluate(self, data_file: str, adapter: str | None = None, **kwargs: Any) -> dict:
        from ..training import evaluate_model

        self.ensure_ready()
        data_path = self._confine(data_file, "data_file", must_exist=True)
        name = self.adapters.resolve(adapter) if adapter not in (None, "") else None

        def run() -> dict:
            model = self.adapters.peft_model or self.host.model
            return evaluate_model(model, self.host.tokenizer, data_file=data_path, adapter=name, **kwargs)

        return {"adapter": name, **self.serving.call(run)}

    def resume_job(self, job_id: str) -> dict:
        """Run an interrupted, failed or cancelled training job again under its id, from its last checkpoint."""
        self.ensure_ready()
        return self.training.resume(job_id, self.train)

    def export(self, adapter: str, output_dir: str, format: str = "gguf", **kwargs: Any) -> dict:  # noqa: A002
        """Merge an adapter (a loaded one's name, or an adapter folder) into a private float copy of the
        base and write it as ``hf`` / ``gguf`` (+ Ollama Modelfile), or the adapter as ``lora-gguf`` (export/)."""
        from ..export import check_format, check_options, export_adapter

        self.ensure_ready()
        fmt = check_format(format)
        check_options(fmt, kwargs)
        if not isinstance(adapter, str) or not adapter:
            raise InvalidInput("adapter must be a loaded adapter's name or an adapter folder.")
        info = self.adapters.infos.get(adapter)
        adapter_dir = Path(info.path) if info else find_adapter_dir(self._confine(adapter, "adapter", must_exist=True))
        out_path = self._confine(output_dir, "output_dir", must_exist=False)
        name = adapter if info else name_for(adapter_dir)
        return run_in_fresh_thread(export_adapter, dict(self.host.args), adapter_dir, out_path, fmt,
                                   models_dir=self.settings.models_dir, adapter_name=name, thread_name="llm-export",
                                   **kwargs)

    def job_status(self, job_id: str) -> dict:
        return self.jobs.get(job_id).to_dict()

    def cancel_job(self, job_id: str) -> dict:
        return self.jobs.cancel(job_id).to_dict()

    def list_jobs(self) -> list[dict]:
        return [job.to_dict() for job in self.jobs.list()]

    # ================================================================== data tools
    def augment(self, data_file: str, output_file: str, methods: list[str] | None = None, copies: int = 1,
                seed: int = 0, *, adapter: str | None = None, **kwargs: Any) -> dict:
        if adapter not in (None, ""):
            self.ensure_ready()
        return self.data.augment(data_file, output_file, methods, copies, seed, adapter=adapter, **kwargs)

    def select_informative(self, data_file: str, k: int, strategy: str = "entropy", *, adapter: str | None = None,
                           output_file: str | None = None, **kwargs: Any) -> dict:
        self.ensure_ready()
        return self.data.select_informative(data_file, k, strategy, adapter=adapter, output_file=output_file,
                                            **kwargs)

    def close(self) -> None:
        for job in self.jobs.active():
            job.cancel_event.set()
        self.serving.close()

