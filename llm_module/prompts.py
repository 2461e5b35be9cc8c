"""One prompt format for training and generation.

Training and ``generate(chat=True)`` both go through these functions, so an adapter
sees at inference exactly the text it was trained on: the model's chat template
when it has one, else the Alpaca template.
"""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("auto", "chat", "alpaca")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(tokenizer, template: str | None = "auto") -> str:
    """'chat' when the tokenizer has a chat template (or it is asked for and present), else 'alpaca'."""
    template = template or "auto"
    if template not in TEMPLATES:
        raise ValueError(f"prompt template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if template == "auto":
        return "chat" if has_chat_template(tokenizer) else "alpaca"
    if template == "chat" and not has_chat_template(tokenizer):
        raise ValueError("this tokenizer has no chat template; use prompt_template='alpaca'")
    return template


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def user_content(instruction: str, input_text: str = "") -> str:
    """The single user turn an (instruction, input) pair becomes in chat form."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def render_prompt(tokenizer, messages: list[dict], template: str = "auto") -> str:
    """Text the model continues from: everything up to where the assistant answers."""
    if resolve_template(tokenizer, template) == "chat":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    instruction = turns[-1]["content"] if turns else ""
    history = "\n".join(f"{m['role']}: {m['content']}" for m in turns[:-1])
    context = "\n".join(part for part in (system, history) if part)
    return alpaca_prompt(instruction, context)


def template_prefix(tokenizer, messages: list[dict], template: str = "auto") -> str:
    """The rendered text before the last message's content: the same for every prompt that has
    these earlier turns (``prefix_cache.py`` computes its keys and values once). Empty when the
    template does not place the content in one piece."""
    marker = "\ue000"  # a private-use character no user text is expected to hold
    probe = messages[:-1] + [{**messages[-1], "content": marker}]
    text = render_prompt(tokenizer, probe, template)
    return text.partition(marker)[0] if text.count(marker) == 1 else ""
