"""What a run leaves beside its adapter: training_log.json and loss_curve.png."""

from __future__ import annotations

import json
from pathlib import Path

from ..paths import atomic_write_text

STEP_KEYS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "num_input_tokens_seen")


def split_history(log_history: list[dict]) -> tuple[list[dict], list[dict]]:
    """Trainer's log history as (per-step training entries, evaluation entries)."""
    steps, evals = [], []
    for entry in log_history:
        if "loss" in entry:
            steps.append({k: entry[k] for k in STEP_KEYS if k in entry})
        elif "eval_loss" in entry:
            evals.append({k: v for k, v in entry.items() if k in ("step", "epoch", "eval_loss")})
    return steps, evals


def write_training_log(path: Path, log_history: list[dict], result: dict) -> None:
    steps, evals = split_history(log_history)
    summary = {k: v for k, v in result.items() if k != "params"}
    atomic_write_text(path, json.dumps({"steps": steps, "eval": evals, "params": result.get("params"),
                                        "result": summary}, indent=1))


def write_loss_curve(path: Path, log_history: list[dict], title: str) -> None:
    """Training loss per step (and eval loss per evaluation) as a PNG, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = split_history(log_history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss", linewidth=1)
        if evals:
            ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp)
        tmp.replace(path)
    finally:
        plt.close(fig)
