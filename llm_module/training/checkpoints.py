"""The output folder of a run: what may be trained into, and which checkpoints can be resumed.

Trainer writes checkpoint-N in place: weights, optimizer, scheduler, RNG state, and
trainer_state.json last of all. A checkpoint is therefore complete exactly when its
trainer_state.json parses; a run killed mid-write leaves one without it, which resume
skips and removes, falling back to the previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from ..errors import Conflict, InvalidInput

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RUN_MARKERS = ("training_log.json", "final", "loss_curve.png")


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders of ``output_dir``, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any((checkpoint / name).is_file() for name in ADAPTER_WEIGHTS)


def is_previous_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_MARKERS) or bool(checkpoints(output_dir))


def check_output_dir(out_path: Path, resume_from_checkpoint: bool | str) -> None:
    """Refuse an output_dir llm.train must not write into, before any work starts."""
    if out_path.exists() and not out_path.is_dir():
        raise InvalidInput(f"output_dir {str(out_path)!r} is a file; give a folder (it is created if missing).")
    if resume_from_checkpoint not in (True, False, None) and not isinstance(resume_from_checkpoint, str):
        raise InvalidInput(f"resume_from_checkpoint must be true, false or a checkpoint path, "
                           f"got {resume_from_checkpoint!r}.")
    if not out_path.is_dir() or not any(out_path.iterdir()):
        return
    if not is_previous_run(out_path):
        names = sorted(p.name for p in out_path.iterdir())[:5]
        raise Conflict(f"output_dir {str(out_path)!r} already holds other files ({', '.join(names)}) and is not a "
                       "previous llm.train run; give an empty or new folder so nothing of yours is overwritten.")


def drop_incomplete(output_dir: Path) -> list[str]:
    """Remove checkpoints a killed run left half-written; return their names."""
    removed = []
    for checkpoint in checkpoints(output_dir):
        if not is_complete(checkpoint):
            shutil.rmtree(checkpoint, ignore_errors=True)
            removed.append(checkpoint.name)
    return removed


def drop_all(output_dir: Path) -> None:
    """A fresh run in a previous run's folder starts without its old checkpoints."""
    for checkpoint in checkpoints(output_dir):
        shutil.rmtree(checkpoint, ignore_errors=True)


def resume_point(output_dir: Path, resume_from_checkpoint: bool | str | None) -> tuple[str | None, list[str]]:
    """The checkpoint to resume from (or None) and warnings about what was skipped."""
    warnings = []
    if not resume_from_checkpoint:
        drop_all(output_dir)
        return None, warnings
    removed = drop_incomplete(output_dir)
    if removed:
        warnings.append(f"Skipped incomplete checkpoint(s) {', '.join(removed)} (a run stopped while writing them).")
    if isinstance(resume_from_checkpoint, str):
        path = Path(resume_from_checkpoint)
        if not is_complete(path):
            raise InvalidInput(f"resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint "
                               f"(no readable {TRAINER_STATE} and adapter weights); pass true to use the last "
                               "complete one in output_dir.")
        return str(path), warnings
    complete = checkpoints(output_dir)
    if not complete:
        warnings.append("resume_from_checkpoint was set but output_dir has no checkpoint; trained from the start.")
        return None, warnings
    return str(complete[-1]), warnings
