"""The named LoRA adapters on the served model: attach, replace, detach, pick one per request.

peft owns the weights: the first adapter wraps the base model in a PeftModel (its LoRA layers
are injected into the base model in place), the last one removed unwraps it, so a model with no
adapters runs at plain speed. An adapter's files are read in full before the model is touched,
and a replacement is attached under a staging name first: a reload whose files are broken (or do
not fit the model) fails without touching the adapter being served. Every change bumps
``version``, which tells the serving core to rebuild its per-row tables.

Changes must run on the model's thread (the engine hands them to ``ServingCore.call``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..adapter_files import AdapterInfo, read_config, read_info, read_weights, unservable_reason
from ..errors import Conflict, InvalidInput, NotFound, suggest

log = logging.getLogger(__name__)

BASE_NAMES = ("base", "__base__")  # what a request names to run without any adapter
STAGING = "__staging__"  # a replacement is attached under this name until it has loaded


class AdapterRegistry:
    def __init__(self, *, allow_pickle: bool = False) -> None:
        self.allow_pickle = allow_pickle
        self.peft_model = None  # the PeftModel around the base model while adapters are loaded
        self.infos: dict[str, AdapterInfo] = {}
        self.default: str | None = None
        self.version = 0
        self.used_at: dict[str, float] = {}  # last request per adapter (least recently used goes first)

    # ------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        return sorted(self.infos)

    def require(self, name: Any) -> AdapterInfo:
        if not isinstance(name, str) or name not in self.infos:
            loaded = ", ".join(sorted(self.infos)) or "none"
            raise NotFound(
                f"No adapter named {name!r} is loaded (loaded: {loaded}).{suggest(str(name), self.infos)} "
                "Load it with llm.load_adapter(path, name)."
            )
        return self.infos[name]

    def resolve(self, name: Any) -> str | None:
        """The adapter a request runs with: the named one, else the default one, else None (base)."""
        if name in (None, ""):
            name = self.default
            if name is None:
                return None
        elif name in BASE_NAMES:
            return None
        self.require(name)
        self.used_at[name] = time.monotonic()
        return name

    def listing(self) -> list[dict]:
        return [{**info.to_dict(), "default": name == self.default} for name, info in sorted(self.infos.items())]

    def set_default(self, name: str | None) -> None:
        if name is not None:
            self.require(name)
        self.default = name

    # ------------------------------------------------------------------ changes (on the model's thread)
    def reset(self) -> None:
        """A new base model: nothing is attached to it yet."""
        self.peft_model, self.infos, self.default = None, {}, None
        self.used_at.clear()
        self.version += 1

    def adopt(self, other: AdapterRegistry) -> None:
        """Take over ``other``'s adapters (attached to a model staged beside the served one)."""
        self.peft_model, self.infos, self.default = other.peft_model, dict(other.infos), other.default
        self.used_at = dict(other.used_at)
        self.version += 1

    def attach(self, model, adapter_dir: Path, name: str, *, replace: bool = False,
               make_default: bool = False) -> AdapterInfo:
        """Load the adapter in ``adapter_dir`` as ``name`` onto ``model`` (the base model)."""
        if name in self.infos and not replace:
            raise Conflict(f"An adapter named {name!r} is already loaded; unload it first or pick another name.")
        from ..runtime.quantize import has_packed_weights

        info = read_info(name, adapter_dir)
        config = _lora_config(adapter_dir, packed_base=has_packed_weights(model))
        weights = read_weights(adapter_dir, allow_pickle=self.allow_pickle)
        if name in self.infos:  # a reload: prove the new weights load before the old ones go
            self._inject(model, STAGING, config, weights, adapter_dir)
            self._remove(STAGING)
            self._remove(name)
        self._inject(model, name, config, weights, adapter_dir)
        self.infos[name] = info
        self.used_at[name] = time.monotonic()
        if make_default:
            self.default = name
        self.version += 1
        return info

    def detach(self, name: str) -> AdapterInfo:
        info = self.require(name)
        self._remove(name)
        del self.infos[name]
        self.used_at.pop(name, None)
        if self.default == name:
            self.default = None
        self.version += 1
        return info

    def _inject(self, model, name: str, config, weights: dict, adapter_dir: Path) -> None:
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict

        created = self.peft_model is None
        try:
            if created:
                self.peft_model = PeftModel(model, config, adapter_name=name)
            else:
                self.peft_model.add_adapter(name, config)
            result = set_peft_model_state_dict(self.peft_model, weights, adapter_name=name)
            missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
            if missing:
                raise InvalidInput(f"Adapter {str(adapter_dir)!r} lacks weights its config names (e.g. "
                                   f"{missing[0]}); its weights file is incomplete: retrain or copy it again.")
        except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
            self._undo_inject(name, created)
            if isinstance(exc, InvalidInput):
                raise
            hint = str(exc).splitlines()[0][:300]
            trained_on = getattr(config, "base_model_name_or_path", None) or "named in its adapter_config.json"
            raise InvalidInput(
                f"Adapter {str(adapter_dir)!r} does not fit the loaded base model ({hint}); its shapes say it was "
                f"trained for another base model ({trained_on}): load that model with llm.setup, or retrain on "
                "this one."
            ) from exc
        self.peft_model.eval()

    def _undo_inject(self, name: str, created: bool) -> None:
        if self.peft_model is None:
            return
        if created:
            self.peft_model.unload()
            self.peft_model = None
        elif name in self.peft_model.peft_config:
            self._remove(name)

    def _remove(self, name: str) -> None:
        """Take ``name``'s LoRA weights out of the model; unwrap it when none is left."""
        peft_model = self.peft_model
        if peft_model is None or name not in peft_model.peft_config:
            return
        if len(peft_model.peft_config) == 1:
            peft_model.unload()  # strips the LoRA layers: back to the plain base model (the same object)
            self.peft_model = None
            return
        if peft_model.active_adapter == name:
            peft_model.set_adapter(next(n for n in peft_model.peft_config if n != name))
        peft_model.delete_adapter(name)


def _lora_config(adapter_dir: Path, *, packed_base: bool):
    from peft import LoraConfig

    raw = read_config(adapter_dir)
    reason = unservable_reason(raw, packed_base=packed_base)
    if reason:
        raise InvalidInput(f"Adapter {str(adapter_dir)!r} cannot be loaded: {reason} To use it on this base model "
                           "as it is, merge it in (peft's merge_and_unload) and load the merged folder with llm.setup.")
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{adapter_dir}/adapter_config.json is not a LoRA config peft can read ({exc}).") from exc
    config.inference_mode = True
    log.debug("Adapter config %s: r=%s targets=%s", adapter_dir, raw.get("r"), raw.get("target_modules"))
    return config
