"""What a request may name as its model: the base model, a loaded adapter, or an adapter folder.

OpenAI-style clients pick the adapter through ``model`` (as vLLM and LoRAX do). A name that is an
adapter folder of the ``adapters_dir`` setting but not loaded yet is loaded on first use (LoRAX's
dynamic loading); past ``max_loaded_adapters`` the least recently used adapter that the folder can
bring back, and that no running request uses, is unloaded first. Both show in ``/v1/models`` and
the log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..adapter_files import adapter_folders
from ..errors import InvalidInput, NotFound, suggest
from ..loader import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID

log = logging.getLogger(__name__)


class ModelCatalog:
    def __init__(self, settings, host, adapters, *, load: Callable[[str, str], Any], unload: Callable[[str], Any],
                 in_use: Callable[[], set[str]]) -> None:
        """``load(path, name)`` / ``unload(name)``: the engine's adapter actions; ``in_use()``: adapters of
        running requests (never unloaded to make room)."""
        self.settings, self.host, self.adapters = settings, host, adapters
        self._load, self._unload, self._in_use = load, unload, in_use
        # Held while adapters of the shared folder change: on-demand loads here, reloads of the whole
        # folder (server/routes_scale.py), so a load that began before a folder was taken out cannot
        # finish after the reload that unloaded it.
        self.lock = threading.RLock()

    def shared_dir(self) -> Path | None:
        """The ``adapters_dir`` setting as a path (relative: to the data root)."""
        folder = self.settings.adapters_dir
        if folder is None:
            return None
        folder = Path(folder).expanduser()
        if not folder.is_absolute() and self.settings.data_root is not None:
            folder = self.settings.data_root / folder
        return folder.resolve()

    def folders(self) -> dict[str, Path]:
        """The adapter folders of ``adapters_dir`` (none without it)."""
        root = self.shared_dir()
        return adapter_folders(root) if root is not None else {}

    def base_names(self) -> set[str]:
        names = {"base", self.host.loaded.name}
        if self.host.loaded.name == DEFAULT_MODEL:
            names.add(DEFAULT_MODEL_HUB_ID)
        return names

    def adapter_for(self, model: Any) -> str:
        """The adapter ``model`` names ("base" for the base model), loading an adapter folder on first use."""
        if not isinstance(model, str) or not model:
            raise InvalidInput("model must be the base model's name, 'base', or an adapter's name.")
        model = model.removeprefix("openai/")  # LiteLLM-style clients may send their provider prefix
        if model in self.base_names():
            return "base"
        if model in self.adapters.infos:
            return model
        folder = self.folders().get(model)
        if folder is None:
            known = [*self.base_names(), *self.adapters.names(), *self.folders()]
            error = NotFound(f"The model {model!r} does not exist here: serve the base model as "
                             f"{self.host.loaded.name!r} (or 'base') or a loaded adapter "
                             f"({', '.join(self.adapters.names()) or 'none loaded'}).{suggest(model, known)}")
            error.param = "model"
            raise error
        self._load_on_demand(model, folder)
        return model

    def _load_on_demand(self, name: str, folder: Path) -> None:
        with self.lock:
            if name in self.adapters.infos:
                return
            shared = self.folders()
            if shared.get(name) != folder:  # taken out (or replaced) while this request waited for the lock
                error = NotFound(f"The adapter folder of {name!r} is gone from the adapters directory; "
                                 "put it back, or load the adapter by path.")
                error.param = "model"
                raise error
            while len(self.adapters.infos) >= self.settings.max_loaded_adapters:
                busy = self._in_use() | {self.adapters.default}
                spare = [n for n in self.adapters.infos if n in shared and n not in busy]
                if not spare:
                    break  # every loaded adapter is in use or cannot come back: go over the bound
                oldest = min(spare, key=lambda n: self.adapters.used_at.get(n, 0.0))
                log.info("Unloading adapter %s (least recently used; max_loaded_adapters=%s)", oldest,
                         self.settings.max_loaded_adapters)
                self._unload(oldest)
            log.info("Loading adapter %s on first use from %s", name, folder)
            self._load(str(folder), name)

    def cards(self) -> list[dict]:
        """``/v1/models``: the base model, then every loaded adapter (OpenAI's model objects)."""
        base = self.host.loaded.name
        cards = [{"id": base, "object": "model", "created": int(self.host.loaded_at), "owned_by": "llm_module",
                  "root": base, "parent": None}]
        for name, info in sorted(self.adapters.infos.items()):
            cards.append({"id": name, "object": "model", "created": int(info.loaded_at), "owned_by": "llm_module",
                          "root": info.path, "parent": base})
        return cards
