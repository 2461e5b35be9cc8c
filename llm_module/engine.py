"""The engine: one base model, its tokenizer, named LoRA adapters, the locks and the jobs.

The Jaseci actions, the HTTP service and the CLI are thin layers over one Engine.
Forward passes and model changes hold ``_model_lock``; generate requests go through
a micro-batcher whose single worker owns the model while a batch runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import adapters as adp
from .batching import MicroBatcher, Unfinished
from .errors import Conflict, InvalidInput, LLMError, ModelLoadError, NotFound, PayloadTooLarge, suggest
from .generation import (
    GenerationRequest,
    Limits,
    cut_at_stop,
    row_budgets,
    row_min_new_tokens,
    stop_when,
    validate_messages,
    validate_options,
    validate_stop,
    yield_when_waiting,
)
from .jobs import JobManager
from .loader import DEFAULT_MODEL, LoadedModel, load_model
from .paths import resolve_user_path
from .prefix_cache import PrefixCache, left_padded
from .prompts import render_prompt, template_prefix
from .state import SavedState, StateFile
from .threads import run_in_fresh_thread

log = logging.getLogger(__name__)

SETUP_KEYS = ("model_name", "tokenizer_name", "tokenizer_kwargs", "model_kwargs", "device", "dtype")


class Engine:
    def __init__(
        self,
        *,
        data_root: str | Path | None = None,
        state_file: StateFile | None = None,
        limits: Limits | None = None,
        batching: bool = True,
        batch_window_s: float = 0.0,
        max_batch: int = 16,
        prefix_cache: bool | None = None,
    ) -> None:
        self.data_root = Path(data_root).resolve() if data_root else None
        self.state_file = state_file or StateFile()
        self.limits = limits or Limits(max_prompts=256)
        self.max_batch = max_batch
        self.jobs = JobManager()
        self._loaded: LoadedModel | None = None
        self._model = None  # the base model, or a PeftModel around it once adapters are loaded
        self._setup_args: dict = {}
        self._adapters: dict[str, adp.AdapterInfo] = {}
        self._default_adapter: str | None = None
        self._model_lock = threading.RLock()
        self._setup_lock = threading.Lock()
        if prefix_cache is None:
            prefix_cache = os.environ.get("LLM_MODULE_PREFIX_CACHE", "1") != "0"
        self._prefixes = PrefixCache() if prefix_cache else None
        self._batcher = (
            MicroBatcher(self._run_batch, key=GenerationRequest.batch_key,
                         size=lambda r: len(r.texts) * r.num_return_sequences,
                         window_s=batch_window_s, max_batch=max_batch)
            if batching else None
        )

    # ----------------------------------------------------------------- setup
    @property
    def ready(self) -> bool:
        return self._loaded is not None

    def setup(
        self,
        model_name: str | None = None,
        lora_dir: str | None = None,
        tokenizer_name: str | None = None,
        *,
        tokenizer_kwargs: dict | None = None,
        model_kwargs: dict | None = None,
        device: str = "auto",
        dtype: str = "auto",
        adapters: dict[str, str] | None = None,
        restore: bool = False,
        reload_remembered: bool = False,
    ) -> dict:
        """Load (or replace) the base model, then the given adapters.

        ``restore``: reload the last setup (model and adapters) when nothing is given.
        ``reload_remembered``: also reload the adapters remembered for this same model
        (a restarted server serves what it served before).
        """
        if restore:
            saved = self.state_file.read()
            if saved and saved.setup:
                log.info("Restoring the last setup: %s", saved.setup)
                try:
                    return self._setup_from_saved(saved)
                except LLMError as exc:
                    raise ModelLoadError(
                        f"The last setup ({saved.setup.get('model_name') or 'default model'}, remembered in "
                        f"{self.state_file.path}) could not be restored: {exc} Call llm.setup(model_name=...) "
                        "to choose a model (model_name='default' for the bundled one)."
                    ) from exc
        args = {
            "model_name": model_name, "tokenizer_name": tokenizer_name, "tokenizer_kwargs": tokenizer_kwargs,
            "model_kwargs": model_kwargs, "device": device, "dtype": dtype,
        }
        self._check_setup_args(args, adapters, lora_dir)
        adapter_paths = dict(adapters or {})
        default = None
        if lora_dir:
            default = _adapter_name_for(Path(lora_dir))
            adapter_paths[default] = lora_dir
        saved = self.state_file.read() if reload_remembered else None
        if saved and saved.setup.get("model_name") == args["model_name"]:
            remembered = {n: p for n, p in saved.adapters.items() if n not in adapter_paths and Path(p).exists()}
            default = default or (saved.default_adapter if saved.default_adapter in remembered else None)
            return self._load(args, {**adapter_paths, **remembered}, default=default, skip=set(remembered))
        return self._load(args, adapter_paths, default=default)

    def _setup_from_saved(self, saved: SavedState) -> dict:
        live = {n: p for n, p in saved.adapters.items() if Path(p).exists()}
        default = saved.default_adapter if saved.default_adapter in live else None
        return self._load(saved.setup, live, default=default, skip=set(live))

    def _check_setup_args(self, args: dict, adapters: Any, lora_dir: Any) -> None:
        for key in ("tokenizer_kwargs", "model_kwargs"):
            if args[key] is not None and not isinstance(args[key], dict):
                raise InvalidInput(f"{key} must be an object of keyword arguments, got {args[key]!r}.")
        if adapters is not None and not isinstance(adapters, dict):
            raise InvalidInput(f"adapters must be an object {{name: path}}, got {adapters!r}.")
        if lora_dir is not None and not isinstance(lora_dir, str):
            raise InvalidInput(f"lora_dir must be a path string, got {lora_dir!r}.")
        for key in ("model_name", "tokenizer_name"):
            args[key] = self._local_model_path(args[key], key)

    def _local_model_path(self, name: Any, what: str) -> Any:
        """An absolute path for a model given as a path (confined to the data root); hub ids pass through."""
        if not isinstance(name, str) or name in ("", "default", DEFAULT_MODEL):
            return name
        looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
        base = self.data_root or Path.cwd()
        if looks_like_path or (base / name).exists():
            return str(resolve_user_path(name, self.data_root, must_exist=True, what=what))
        return name

    def _load(self, args: dict, adapter_paths: dict, default: str | None, skip: set[str] = frozenset()) -> dict:
        """Load the model and adapters; a failing adapter named in ``skip`` is logged and left out."""
        if not self._setup_lock.acquire(blocking=False):
            raise Conflict("Another setup is running; wait for it to finish, then call setup again.")
        try:
            # Outside the model lock, so generation goes on meanwhile; in a thread of its own (threads.py).
            loaded, model, infos = run_in_fresh_thread(self._load_model_and_adapters, args, adapter_paths, skip)
            with self._model_lock:
                self._loaded, self._model, self._setup_args = loaded, model, args
                self._adapters, self._default_adapter = infos, default if default in infos else None
                self._forget_prefixes()
            self._save_state()
            return self.describe(seconds=loaded.seconds)
        finally:
            self._setup_lock.release()

    def _load_model_and_adapters(self, args: dict, adapter_paths: dict, skip: set[str]) -> tuple:
        loaded = load_model(**args)
        from .speed import prepare_for_inference  # imports torch: only once a model is loaded

        # Serving copy only (training loads its own float copy): see llm_module/speed.py, bench/README.md.
        prepare_for_inference(loaded.model, loaded.device, source=loaded.source)
        model, infos = loaded.model, {}
        for name, path in adapter_paths.items():
            try:
                adapter_dir = adp.find_adapter_dir(
                    resolve_user_path(path, self.data_root, must_exist=False, what=f"adapter {name!r}"))
                model = adp.attach(model, adapter_dir, adp.check_name(name))
                infos[name] = adp.read_info(name, adapter_dir)
            except Exception as exc:
                if name not in skip:
                    raise
                log.warning("Skipping adapter %s from %s: %s", name, path, exc)
        return loaded, model, infos

    def ensure_ready(self) -> None:
        """Load the default model (or the last setup) when nothing is loaded yet."""
        if not self.ready:
            self.setup(restore=True)

    def describe(self, **extra: Any) -> dict:
        if not self.ready:
            return {"ready": False, "model": None, "adapters": [], **extra}
        loaded = self._loaded
        base = self._model.get_base_model() if self._adapters else self._model
        return {
            "ready": True,
            "model": loaded.name,
            "source": loaded.source,
            "parameters": sum(p.numel() for p in base.parameters()),
            "device": loaded.device,
            "dtype": loaded.dtype,
            "context_length": self._context_length(),
            "chat_template": bool(getattr(loaded.tokenizer, "chat_template", None)),
            "adapters": sorted(self._adapters),
            "default_adapter": self._default_adapter,
            **extra,
        }

    def _save_state(self) -> None:
        setup = {k: v for k, v in self._setup_args.items() if v is not None}
        self.state_file.write(SavedState(
            setup=setup,
            adapters={n: i.path for n, i in self._adapters.items()},
            default_adapter=self._default_adapter,
        ))

    def _context_length(self) -> int:
        config = self._loaded.model.config
        return int(getattr(config, "max_position_embeddings", 0) or 2048)

    @property
    def tokenizer(self):
        self.ensure_ready()
        return self._loaded.tokenizer

    # -------------------------------------------------------------- adapters
    def load_adapter(self, path: str, name: str | None = None, *, replace: bool = False,
                     make_default: bool = False) -> dict:
        self.ensure_ready()
        resolved = resolve_user_path(path, self.data_root, must_exist=False, what="adapter path")
        adapter_dir = adp.find_adapter_dir(resolved)
        name = adp.check_name(name or _adapter_name_for(resolved))
        info = adp.read_info(name, adapter_dir)
        start = time.perf_counter()
        run_in_fresh_thread(self._attach, info, adapter_dir, replace, make_default)
        self._save_state()
        return {**info.to_dict(), "seconds": round(time.perf_counter() - start, 4)}

    def _attach(self, info: adp.AdapterInfo, adapter_dir: Path, replace: bool, make_default: bool) -> None:
        name = info.name
        with self._model_lock:
            if name in self._adapters and not replace:
                raise Conflict(f"An adapter named {name!r} is already loaded; unload it first or pick another name.")
            old = self._adapters.get(name)
            self._forget_prefixes()  # a replaced adapter's cached prefixes are stale
            if old:
                self._model = adp.detach(self._model, name)
            try:
                self._model = adp.attach(self._model, adapter_dir, name)
            except Exception:
                if old:  # put the previous weights back: a failed reload loses nothing
                    self._model = adp.attach(self._model, Path(old.path), name)
                raise
            self._adapters[name] = info
            if make_default:
                self._default_adapter = name

    def unload_adapter(self, name: str) -> dict:
        self.ensure_ready()
        info = run_in_fresh_thread(self._detach, name)
        self._save_state()
        return {"unloaded": name, "path": info.path, "adapters": sorted(self._adapters)}

    def _detach(self, name: str) -> adp.AdapterInfo:
        with self._model_lock:
            self._require_adapter(name)
            self._model = adp.detach(self._model, name)
            self._forget_prefixes()  # the name may come back with other weights
            info = self._adapters.pop(name)
            if self._default_adapter == name:
                self._default_adapter = None
        return info

    def _forget_prefixes(self) -> None:
        """Drop cached prefix keys and values: the model or an adapter changed (hold the model lock)."""
        if self._prefixes is not None:
            self._prefixes.clear()

    def list_adapters(self) -> list[dict]:
        return [
            {**info.to_dict(), "default": name == self._default_adapter}
            for name, info in sorted(self._adapters.items())
        ]

    def set_default_adapter(self, name: str | None) -> dict:
        self.ensure_ready()
        if name is not None:
            self._require_adapter(name)
        self._default_adapter = name
        self._save_state()
        return {"default_adapter": name}

    def _require_adapter(self, name: Any) -> adp.AdapterInfo:
        if not isinstance(name, str) or name not in self._adapters:
            loaded = ", ".join(sorted(self._adapters)) or "none"
            raise NotFound(
                f"No adapter named {name!r} is loaded (loaded: {loaded}).{suggest(str(name), self._adapters)} "
                "Load it with llm.load_adapter(path, name)."
            )
        return self._adapters[name]

    def adapter_for(self, adapter: str | None) -> str | None:
        """The adapter a request runs with: the named one, else the default one, else None (base)."""
        if adapter in (None, ""):
            return self._default_adapter
        if adapter in ("base", adp.BASE):
            return None
        self._require_adapter(adapter)
        return adapter

    # ------------------------------------------------------------ generation
    def build_request(
        self,
        prompt: str | list[str] | None = None,
        *,
        messages: list[dict] | None = None,
        chat: bool = False,
        system_prompt: str | None = None,
        adapter: str | None = None,
        return_full_text: bool | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **options: Any,
    ) -> GenerationRequest:
        self.ensure_ready()
        texts, single, prefix = self._prompt_texts(prompt, messages, chat, system_prompt)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidInput(f"seed must be an integer, got {seed!r}.")
        options = validate_options(options, self.limits)
        templated = bool(chat or messages)
        return GenerationRequest(
            texts=texts,
            adapter=self.adapter_for(adapter),
            options=options,
            return_full_text=(not templated) if return_full_text is None else bool(return_full_text),
            stop=validate_stop(stop),
            seed=seed if options.get("do_sample") else None,
            single=single,
            prefix=prefix,
        )

    def _prompt_texts(self, prompt, messages, chat, system_prompt) -> tuple[list[str], bool, str]:
        """(rendered prompts, whether the caller gave one, the text they all start with)."""
        tokenizer = self._loaded.tokenizer
        if messages is not None:
            if prompt not in (None, ""):
                raise InvalidInput("Pass either prompt or messages, not both.")
            messages = validate_messages(messages)
            return [render_prompt(tokenizer, messages)], True, template_prefix(tokenizer, messages)
        single = isinstance(prompt, str)
        prompts = [prompt] if single else prompt
        if not isinstance(prompts, list) or not prompts:
            raise InvalidInput(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
        if self.limits.max_prompts and len(prompts) > self.limits.max_prompts:
            raise PayloadTooLarge(
                f"{len(prompts)} prompts in one call is over the cap of {self.limits.max_prompts}; "
                "split them into several calls."
            )
        for i, text in enumerate(prompts):
            if not isinstance(text, str) or not text.strip():
                raise InvalidInput(f"prompt{'' if single else f'[{i}]'} is empty or not a string; give some text.")
            if self.limits.max_prompt_chars and len(text) > self.limits.max_prompt_chars:
                raise PayloadTooLarge(
                    f"A prompt of {len(text)} characters is over the cap of {self.limits.max_prompt_chars}; "
                    "shorten it."
                )
        if not chat:
            return prompts, single, ""
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        prompts = [render_prompt(tokenizer, system + [{"role": "user", "content": p}]) for p in prompts]
        return prompts, single, template_prefix(tokenizer, system + [{"role": "user", "content": ""}])

    def generate(self, prompt: str | list[str] | None = None, **kwargs: Any) -> list:
        """``[{"generated_text": ...}]`` for one prompt; one such list per prompt for a list."""
        request = self.build_request(prompt, **kwargs)
        if self._batcher is None:
            with self._model_lock:
                return self._run_batch([request])[0]
        return self._batcher.submit(request).result()

    def _run_batch(self, requests: list[GenerationRequest]) -> list:
        """Run requests sharing options as one (chunked) batch; return one result per request.

        A batch of resumable requests with room to spare stops early when requests are waiting
        to join it and re-running it is cheap (generation.yield_when_waiting): its requests come
        back as ``Unfinished`` remainders that the batcher runs together with the newcomers.
        """
        rows = [(r, i, text) for r in requests for i, text in enumerate(r.texts)
                for _ in range(r.num_return_sequences)]
        may_yield = (self._batcher is not None and len(rows) < self.max_batch
                     and all(r.resumable for r in requests))
        outputs: list = []
        with self._model_lock:
            for start in range(0, len(rows), self.max_batch):
                outputs += self._generate_rows(requests[0], rows[start:start + self.max_batch], may_yield)
        results, cursor = [], 0
        for r in requests:
            if isinstance(outputs[cursor], list):  # tokens so far: the request yielded (one row)
                results.append(Unfinished(dataclasses.replace(r, partial=outputs[cursor], yields=r.yields + 1)))
                cursor += 1
                continue
            per_prompt = []
            for text in r.texts:
                group = outputs[cursor:cursor + r.num_return_sequences]
                cursor += r.num_return_sequences
                per_prompt.append([{"generated_text": (text + out) if r.return_full_text else out} for out in group])
            results.append(per_prompt[0] if r.single else per_prompt)
        return results

    def _generate_rows(self, template: GenerationRequest, rows: list, may_yield: bool = False) -> list:
        """Each row's completion; with ``may_yield``, the tokens so far of rows a yield cut short."""
        import torch
        from transformers import StoppingCriteriaList

        tokenizer, model = self._loaded.tokenizer, self._model
        row_adapters = [r.adapter for r, _, _ in rows]
        partials = [r.partial for r, _, _ in rows]
        enc = self._encode([text for _, _, text in rows], template.prefix, row_adapters, partials)
        prompt_len = enc["input_ids"].shape[1]
        options = dict(template.options, num_return_sequences=1)
        self._fit_context(options, int(enc["attention_mask"].sum(dim=1).max()))
        adapters, extra = self._adapter_rows(row_adapters)
        criteria, budgets = [], [options.get("max_new_tokens", 0) - len(p) for p in partials]
        if any(partials):  # resumed rows have fewer tokens to go, and may end sooner
            criteria.append(row_budgets(prompt_len, budgets))
        extra.update(self._min_length_processor(options, prompt_len, partials))
        yielder = None
        if may_yield:
            key, room = template.batch_key(), self.max_batch - len(rows)
            uncached = int(enc["attention_mask"].sum()) - len(rows) * _cached_length(enc)
            yielder = yield_when_waiting(lambda: min(self._batcher.waiting(key), room), len(rows), prompt_len,
                                         min(budgets), uncached)
            criteria.append(yielder)
        if criteria:
            extra["stopping_criteria"] = StoppingCriteriaList(criteria)
        if template.stop:
            extra.update(stop_strings=template.stop, tokenizer=tokenizer)
        if template.seed is not None:
            torch.manual_seed(template.seed)
        with torch.inference_mode(), adapters:
            out = model.generate(**enc, **options, **extra, pad_token_id=tokenizer.pad_token_id)
        new = [p + row.tolist() for p, row in zip(partials, out[:, prompt_len:], strict=True)]
        if yielder is not None and yielder.fired:
            ends = self._eos_ids() | {tokenizer.pad_token_id}
            return [self._decode(ids, template.stop) if ends & set(ids) or len(ids) >= options["max_new_tokens"]
                    else ids for ids in new]
        return [self._decode(ids, template.stop) for ids in new]

    def _min_length_processor(self, options: dict, prompt_len: int, partials: list[list[int]]) -> dict:
        """generate kwargs that hold back end-of-sequence until each row has ``min_new_tokens``
        (less the tokens a resumed row already has); takes the option out of ``options``."""
        from transformers import LogitsProcessorList

        least = options.pop("min_new_tokens", 0)
        minimums = [max(0, least - len(p)) for p in partials]
        if not any(minimums):
            return {}
        return {"logits_processor": LogitsProcessorList([row_min_new_tokens(prompt_len, minimums, self._eos_ids())])}

    def _decode(self, ids: list[int], stop: list[str]) -> str:
        return cut_at_stop(self._loaded.tokenizer.decode(ids, skip_special_tokens=True), stop)

    def _eos_ids(self) -> set[int]:
        eos = self._loaded.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def _encode(self, texts: list[str], prefix: str, row_adapters: list[str | None],
                partials: list[list[int]] | None = None) -> dict:
        """generate's inputs for these prompts (each followed by its ``partials`` tokens, if any):
        with the shared prefix's cache when they all start with it.

        Call with the model lock held: a cache miss runs the prefix through the model.
        """
        import torch

        tokenizer, device = self._loaded.tokenizer, self._loaded.device
        rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if partials:
            rows = [row + partial for row, partial in zip(rows, partials, strict=True)]
        if self._prefixes is not None and prefix and all(t.startswith(prefix) for t in texts):
            with torch.inference_mode():
                batch = self._prefixes.batch(rows, tokenizer(prefix, add_special_tokens=False)["input_ids"],
                                             row_adapters, self._prefix_key_values, tokenizer.pad_token_id,
                                             self._loaded.model.config)
            if batch is not None:
                return {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device),
                        "past_key_values": batch.past_key_values}
        ids, mask = left_padded(rows, tokenizer.pad_token_id)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def _prefix_key_values(self, prefix: list[int], adapter: str | None) -> list:
        """Keys and values of ``prefix`` under ``adapter``, per layer (a prefix cache miss)."""
        import torch

        adapters, extra = self._adapter_rows([adapter])
        with torch.inference_mode(), adapters:
            ids = torch.tensor([prefix], device=self._loaded.device)
            cache = self._model(input_ids=ids, use_cache=True, **extra).past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _adapter_rows(self, row_adapters: list[str | None]) -> tuple[Any, dict]:
        """(context, generate kwargs) that give each row its adapter; call with the model lock held."""
        if not self._adapters:
            return contextlib.nullcontext(), {}
        from .lora_batch import adapter_rows  # imports torch: only once adapters exist

        return adapter_rows(self._model, [name or adp.BASE for name in row_adapters])

    def _fit_context(self, options: dict, longest_prompt: int) -> None:
        context = self._context_length()
        if longest_prompt >= context:
            raise InvalidInput(
                f"The prompt is {longest_prompt} tokens but the model's context is {context}; shorten the prompt."
            )
        if "max_new_tokens" in options:
            options["max_new_tokens"] = min(options["max_new_tokens"], context - longest_prompt)

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        request = self.build_request(prompt, **kwargs)
        if len(request.texts) != 1 or request.num_return_sequences != 1:
            raise InvalidInput("Streaming takes one prompt and num_return_sequences=1.")
        tokenizer = self._loaded.tokenizer
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []
        reader_left = threading.Event()  # the consumer stopped reading: generation ends at the next token

        def work() -> None:
            import torch

            try:
                with self._model_lock, torch.inference_mode():
                    enc = self._encode(request.texts, request.prefix, [request.adapter])
                    options = dict(request.options)
                    self._fit_context(options, enc["input_ids"].shape[1])
                    adapters, extra = self._adapter_rows([request.adapter])
                    extra.update(self._min_length_processor(options, enc["input_ids"].shape[1], [[]]))
                    if request.seed is not None:
                        torch.manual_seed(request.seed)
                    with adapters:
                        self._model.generate(**enc, **options, **extra, streamer=streamer,
                                             stopping_criteria=stop_when(reader_left),
                                             pad_token_id=tokenizer.pad_token_id)
            except BaseException as exc:
                failure.append(exc)
                streamer.end()

        if self._batcher is None:
            threading.Thread(target=work, name="llm-stream", daemon=True).start()
        else:  # on the thread that runs every forward pass (threads.py), between batches
            self._batcher.submit_call(work)
        emitted = ""
        try:
            for piece in streamer:
                emitted += piece
                cut = cut_at_stop(emitted, request.stop) if request.stop else emitted
                if len(cut) < len(emitted):
                    yield cut[len(emitted) - len(piece):]
                    break
                yield piece
        finally:  # also when the reader closes the generator (a client that disconnected)
            reader_left.set()
        if failure:
            raise failure[0]

    # --------------------------------------------------- training and jobs
    def train(self, data_file: str, output_dir: str, training_params: dict | None = None,
              resume_from_checkpoint: bool | str = False, *, adapter_name: str | None = None,
              background: bool = False, **kwargs: Any) -> dict:
        from .training import check_output_dir, train_adapter
        from .training.distributed import pop_launch_options, train_distributed

        launch = pop_launch_options(kwargs)  # num_processes > 1 or nnodes > 1: a torchrun job, else in-process
        self.ensure_ready()
        data_path = resolve_user_path(data_file, self.data_root, must_exist=True, what="data_file")
        out_path = resolve_user_path(output_dir, self.data_root, must_exist=False, what="output_dir")
        name = adp.check_name(adapter_name or out_path.name)
        for info in self._adapters.values():
            live = Path(info.path).resolve()
            if out_path == live or live in out_path.parents:
                raise Conflict(
                    f"output_dir {output_dir!r} is the folder of the loaded adapter {info.name!r}; training there "
                    "would overwrite it. Pick a new output_dir (its final/ folder becomes the adapter)."
                )
        check_output_dir(out_path, resume_from_checkpoint)
        if isinstance(resume_from_checkpoint, str):
            resume_from_checkpoint = str(resolve_user_path(
                resume_from_checkpoint, self.data_root, must_exist=True, what="resume_from_checkpoint"))
        for job in self.jobs.active():
            if job.kind == "train" and job.params.get("output_dir") == str(out_path):
                raise Conflict(f"Job {job.id} is already training into {output_dir!r}; wait or cancel it.")
        params = {"data_file": str(data_path), "output_dir": str(out_path), "adapter_name": name}
        show_progress = kwargs.pop("show_progress", not background)

        def work(progress, cancel) -> dict:
            if launch is not None:
                result = train_distributed(
                    launch, setup_args=self._setup_args, data_file=data_path, output_dir=out_path,
                    training_params=training_params, resume_from_checkpoint=resume_from_checkpoint,
                    progress=progress, cancel=cancel, base_model_name=self._loaded.name,
                    show_progress=show_progress, **kwargs,
                )
                return self._load_trained(result, name)
            fresh = load_model(**self._setup_args)  # a private copy: serving goes on untouched
            try:
                result = train_adapter(
                    fresh.model, fresh.tokenizer, data_file=data_path, output_dir=out_path,
                    training_params=training_params, resume_from_checkpoint=resume_from_checkpoint,
                    progress=progress, cancel=cancel, base_model_name=self._loaded.name,
                    show_progress=show_progress, **kwargs,
                )
            finally:
                del fresh
                _release_memory()  # the copy, optimizer and activations: give them back to the OS
            return self._load_trained(result, name)

        if background:
            job = self.jobs.start("train", params, work)
            return {"job_id": job.id, "state": job.state, **params}
        return run_in_fresh_thread(work, lambda progress: None, threading.Event(), thread_name="llm-train")

    def _load_trained(self, result: dict, name: str) -> dict:
        """Make a finished run's adapter live (a node other than 0 of a multi-node run wrote none)."""
        if not result.get("cancelled") and result.get("adapter_dir"):
            result["adapter"] = self.load_adapter(result["adapter_dir"], name, replace=True)["name"]
        return result

    def evaluate(self, data_file: str, adapter: str | None = None, **kwargs: Any) -> dict:
        from .training import evaluate_model

        self.ensure_ready()
        data_path = resolve_user_path(data_file, self.data_root, must_exist=True, what="data_file")
        name = self.adapter_for(adapter) if adapter not in (None, "") else None

        def run() -> dict:
            with self._model_lock:
                return evaluate_model(self._model, self._loaded.tokenizer, data_file=data_path,
                                      adapter=name if self._adapters else None, **kwargs)

        return {"adapter": name, **run_in_fresh_thread(run)}

    def job_status(self, job_id: str) -> dict:
        return self.jobs.get(job_id).to_dict()

    def cancel_job(self, job_id: str) -> dict:
        return self.jobs.cancel(job_id).to_dict()

    def list_jobs(self) -> list[dict]:
        return [job.to_dict() for job in self.jobs.list()]

    def close(self) -> None:
        for job in self.jobs.active():
            job.cancel_event.set()
        if self._batcher is not None:
            self._batcher.stop()

    # ------------------------------------------------------ small-data strategies
    def augment(self, data_file: str, output_file: str, methods: list[str] | None = None, copies: int = 1,
                seed: int = 0, *, adapter: str | None = None, **kwargs: Any) -> dict:
        """Write ``data_file``'s records plus augmented copies to ``output_file`` (see llm_module.augment)."""
        from .augment import augment_file

        data_path = resolve_user_path(data_file, self.data_root, must_exist=True, what="data_file")
        out_path = resolve_user_path(output_file, self.data_root, must_exist=False, what="output_file")
        if adapter not in (None, ""):
            self.ensure_ready()
            self.adapter_for(adapter)  # an unknown adapter fails here, before any record is read

        def paraphrase(prompts: list[str], **options: Any) -> list:
            return self.generate(prompts, chat=True, adapter=adapter, **options)

        return augment_file(data_path, out_path, methods=methods or ["synonym"], copies=copies, seed=seed,
                            generate=paraphrase, **kwargs)

    def select_informative(self, data_file: str, k: int, strategy: str = "entropy", *, adapter: str | None = None,
                           output_file: str | None = None, **kwargs: Any) -> dict:
        """The ``k`` records of ``data_file`` the model is least sure of (see llm_module.active)."""
        from .active import select_informative

        self.ensure_ready()
        data_path = resolve_user_path(data_file, self.data_root, must_exist=True, what="data_file")
        out_path = (resolve_user_path(output_file, self.data_root, must_exist=False, what="output_file")
                    if output_file else None)
        name = self.adapter_for(adapter)
        return run_in_fresh_thread(select_informative, self._model, self._loaded.tokenizer, data_path, k,
                                   strategy=strategy, adapter=name, multi_adapter=bool(self._adapters),
                                   output_path=out_path, lock=self._model_lock, **kwargs)


def _cached_length(inputs: dict) -> int:
    cache = inputs.get("past_key_values")
    return cache.get_seq_length() if cache is not None else 0


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise),
    so a long-running server's resident memory returns to its serving size after a training job."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _adapter_name_for(path: Path) -> str:
    """An adapter's default name: its folder, or the run folder for a llm.train ``final/``."""
    path = Path(path)
    return path.parent.name if path.name == "final" else path.name


_default_engine: Engine | None = None
_default_lock = threading.Lock()


def default_engine() -> Engine:
    """The process-wide engine the Jaseci actions use (module reloads by jaseci keep it)."""
    global _default_engine
    with _default_lock:
        if _default_engine is None:
            _default_engine = Engine()
        return _default_engine


def set_default_engine(engine: Engine) -> Engine | None:
    """Make ``engine`` the one the Jaseci actions use (the HTTP service installs its configured one).

    Returns the engine it replaces, if any, so a caller can put it back.
    """
    global _default_engine
    with _default_lock:
        previous, _default_engine = _default_engine, engine
        return previous
