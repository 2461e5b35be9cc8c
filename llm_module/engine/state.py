"""What to restore in a new process: the last setup and the adapters loaded since.

jaseci re-imports action modules in every new ``jsctl`` process and calls
``setup()`` with no arguments; reading this file makes that load the model and
adapters the user set up last instead of silently falling back to the default.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..paths import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class SavedState:
    setup: dict = field(default_factory=dict)  # the setup kwargs, minus adapters
    adapters: dict = field(default_factory=dict)  # name -> adapter dir
    default_adapter: str | None = None


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> SavedState | None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return SavedState(**{k: raw[k] for k in ("setup", "adapters", "default_adapter") if k in raw})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("Ignoring unreadable state file %s: %s", self.path, exc)
            return None

    def write(self, state: SavedState) -> None:
        try:
            atomic_write_text(self.path, json.dumps(asdict(state), indent=2))
        except OSError as exc:  # a read-only home must not break generation
            log.warning("Could not save state to %s: %s", self.path, exc)
