"""The served base model: loading a new one beside it, installing it, describing it.

The host holds the one handle to the served model (the transformers model; the adapter registry
holds peft's wrapper around it) and its tokenizer. ``stage`` loads and prepares a new model in
a thread of its own while the current one keeps serving; ``install`` makes it the served one
(the engine runs that on the model's thread once the running rows finished). Every install
bumps ``version``, which tells the serving core to build a new runner.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInput
from ..loader import DEFAULT_MODEL, LoadedModel, is_local_name, load_model
from ..paths import resolve_user_path

log = logging.getLogger(__name__)

SETUP_KEYS = ("model_name", "tokenizer_name", "tokenizer_kwargs", "model_kwargs", "device", "dtype", "quantize")


@dataclass
class StagedModel:
    """A loaded and prepared model, not served yet."""

    loaded: LoadedModel
    patches: Any  # runtime.prepare.Patches
    args: dict


class ModelHost:
    def __init__(self, settings) -> None:
        self.settings = settings
        self.loaded: LoadedModel | None = None
        self.patches = None
        self.args: dict = {}
        self.version = 0
        self.loaded_at = 0.0

    @property
    def ready(self) -> bool:
        return self.loaded is not None

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    # ------------------------------------------------------------------ setup arguments
    def check_args(self, args: dict) -> dict:
        """Setup's arguments, checked, with model paths made absolute (confined to the data root)."""
        for key in ("tokenizer_kwargs", "model_kwargs"):
            if args.get(key) is not None and not isinstance(args[key], dict):
                raise InvalidInput(f"{key} must be an object of keyword arguments, got {args[key]!r}.")
        quantize = args.get("quantize")
        if quantize is not None and quantize not in ("auto", "none", "int8", "int4"):
            raise InvalidInput(f"quantize must be one of auto, none, int8, int4; got {quantize!r}.")
        for key in ("model_name", "tokenizer_name"):
            args[key] = self._local_path(args.get(key), key)
        return args

    def _local_path(self, name: Any, what: str) -> Any:
        """An absolute path for a model given as a path (confined to the data root); hub ids pass through."""
        if not isinstance(name, str) or name in ("", "default", DEFAULT_MODEL):
            return name
        base = self.settings.data_root or Path.cwd()
        if is_local_name(name) or (base / name).exists():
            return str(resolve_user_path(name, self.settings.data_root, must_exist=True, what=what))
        return name

    # ------------------------------------------------------------------ loading and serving
    def stage(self, args: dict) -> StagedModel:
        """Load and prepare the model ``args`` name (run it in a fresh thread: runtime/threads.py)."""
        from ..runtime.prepare import prepare  # imports torch: only once a model is loaded

        loader_args = {k: v for k, v in args.items() if k != "quantize"}
        loaded = load_model(**loader_args, models_dir=self.settings.models_dir)
        patches = prepare(loaded.model, self.settings, device=loaded.device, source=loaded.source,
                          quantize=args.get("quantize"), tokenizer=loaded.tokenizer)
        return StagedModel(loaded, patches, args)

    def install(self, staged: StagedModel) -> None:
        """Serve ``staged`` from now on (on the model's thread, with no row running)."""
        self.loaded, self.patches, self.args = staged.loaded, staged.patches, staged.args
        self.loaded_at = time.time()
        self.version += 1

    def context_length(self) -> int:
        return int(getattr(self.loaded.model.config, "max_position_embeddings", 0) or 2048)

    def describe(self) -> dict:
        from ..runtime.quantize import parameter_count

        loaded = self.loaded
        return {
            "ready": True,
            "model": loaded.name,
            "source": loaded.source,
            "parameters": parameter_count(loaded.model),
            "device": loaded.device,
            "dtype": loaded.dtype,
            "context_length": self.context_length(),
            "chat_template": bool(getattr(loaded.tokenizer, "chat_template", None)),
            "serving": self.patches.to_dict() if self.patches is not None else {},
        }
