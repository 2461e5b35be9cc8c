"""An Ollama ``Modelfile`` for an exported model: the file, the chat template, stop tokens, system prompt.

Ollama's TEMPLATE is a Go template, not the tokenizer's Jinja one, so the chat formats we can
recognise are written out (ChatML, as SmolLM2 and Qwen use; Llama 3). The default system prompt
the Jinja template adds when a conversation has none (SmolLM2: "You are a helpful AI assistant
named SmolLM...") becomes the SYSTEM line: the adapter was trained with it in every prompt
(training/data.py renders examples with the same template), so Ollama must send it too.
"""

from __future__ import annotations

import re
from pathlib import Path

CHATML = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}'
          '<|im_start|>assistant\n{{ .Response }}<|im_end|>\n')
LLAMA3 = ('{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
          '{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}'
          '<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>')
MARK = "\ue000"


def chat_format(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    return None


def default_system_prompt(tokenizer) -> str | None:
    """The system turn the chat template adds to a conversation that has none, if any."""
    fmt = chat_format(tokenizer)
    if fmt is None:
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], add_generation_prompt=True,
                                             tokenize=False)
    except Exception:  # a template that needs more than a user turn: no default to copy
        return None
    pattern = r"<\|im_start\|>system\n(.*?)<\|im_end\|>" if fmt == "chatml" else \
        r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"
    found = re.search(pattern, text.split(MARK)[0], re.S)
    return found.group(1) if found and found.group(1).strip() else None


def stop_tokens(tokenizer) -> list[str]:
    fmt = chat_format(tokenizer)
    stops = {"chatml": ["<|im_end|>", "<|im_start|>"], "llama3": ["<|eot_id|>", "<|start_header_id|>"]}.get(fmt, [])
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    return stops


def _quote(text: str) -> str:
    if '"""' in text:
        text = text.replace('"""', '" " "')
    return f'"""{text}"""'


def write_modelfile(path: Path, tokenizer, *, model_file: str | None, adapter_file: str | None = None,
                    system_prompt: str | None = None) -> None:
    """``ollama create NAME -f Modelfile`` in the export folder builds the model."""
    lines = ["# Written by llm_module's llm.export. Build: ollama create <name> -f Modelfile"]
    if model_file and (adapter_file is None or Path(model_file).is_absolute()):
        lines.append(f"FROM {model_file if Path(model_file).is_absolute() else './' + model_file}")
    else:
        lines.append("# FROM: the base model's GGUF file (the adapter was trained on it); put its path here")
        lines.append("FROM ./base-model.gguf")
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    fmt = chat_format(tokenizer)
    if fmt is not None:
        lines.append(f"TEMPLATE {_quote(CHATML if fmt == 'chatml' else LLAMA3)}")
    else:
        lines.append("# TEMPLATE: left to Ollama, which reads tokenizer.chat_template from the GGUF file")
    system = system_prompt if system_prompt is not None else default_system_prompt(tokenizer)
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    for stop in stop_tokens(tokenizer):
        lines.append(f'PARAMETER stop "{stop}"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
