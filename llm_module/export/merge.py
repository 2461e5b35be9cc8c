"""The base model with an adapter merged in, on a private float copy, saved for plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InvalidInput
from ..loader import LoadedModel, load_model


def load_base(setup_args: dict, models_dir: Path) -> LoadedModel:
    """A private float32 CPU copy of the base model the engine serves (never the served copy)."""
    args = {k: v for k, v in setup_args.items() if k not in ("quantize", "device", "dtype")}
    return load_model(**args, device="cpu", dtype="float32", models_dir=models_dir)


def attach(model, adapter_dir: Path, config: dict):
    """``model`` wrapped in a PeftModel holding the adapter's weights (safetensors only, as the
    engine loads adapters: a pickled file is never unpickled here)."""
    from peft import LoraConfig, PeftModel
    from peft.utils import set_peft_model_state_dict

    from ..adapter_files import read_weights

    weights = read_weights(adapter_dir)
    try:
        lora_config = LoraConfig.from_pretrained(str(adapter_dir))
        lora_config.inference_mode = True
        peft_model = PeftModel(model, lora_config)
        result = set_peft_model_state_dict(peft_model, weights)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        hint = str(exc).splitlines()[0][:300]
        raise InvalidInput(f"Adapter {str(adapter_dir)!r} does not fit the loaded base model ({hint}); export it with "
                           "the base model it was trained on loaded (llm.setup).") from exc
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise InvalidInput(f"Adapter {str(adapter_dir)!r} lacks weights its config names (e.g. {missing[0]}).")
    peft_model.eval()
    return peft_model


def merged_model(model, adapter_dir: Path, config: dict):
    """The base model with the adapter's update added into its weights (W + scale * B @ A)."""
    return attach(model, adapter_dir, config).merge_and_unload()


def save_hf(model, tokenizer, folder: Path) -> None:
    """safetensors weights, config, generation config, tokenizer and chat template in ``folder``."""
    model.config.use_cache = True
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    _plain_tokenizer_config(folder)


def _plain_tokenizer_config(folder: Path) -> None:
    """Right padding as transformers defaults to (llm_module pads left for its own batches)."""
    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    config.pop("padding_side", None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
