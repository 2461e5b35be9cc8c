"""llm.train on several processes: a torchrun (``python -m torch.distributed.run``) job.

The parent (the engine's job thread) writes a spec file, starts torchrun in a session of
its own running ``llm_module.training.worker`` N times, and reads the JSON lines the
workers print: which ranks started, rank 0's progress, the result or an error. Each
worker runs the same ``train_adapter`` as an in-process run; Trainer sees torchrun's
environment and trains with DDP (gloo on CPU, nccl on CUDA). Rank 0 alone writes
``output_dir/final``, atomically, so the adapter is the one a local run would write.

Cancel terminates torchrun, which stops its workers: ``final/`` stays the last good one,
and the epoch checkpoints remain for ``resume_from_checkpoint=True``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    LLMError,
    ModelLoadError,
    NotFound,
    NotReady,
    PayloadTooLarge,
)

log = logging.getLogger(__name__)

LAUNCH_KEYS = ("num_processes", "nnodes", "node_rank", "master_addr", "master_port")
EVENT_PREFIX = "@llm_module@ "  # marks the worker lines the parent parses; everything else is log output
TERMINATE_GRACE_S = 20.0  # torchrun forwards SIGTERM to its workers and waits for them; then SIGKILL
LOG_TAIL_LINES = 60
_ERROR_TYPES = {cls.kind: cls for cls in (InvalidInput, Forbidden, NotFound, Conflict, PayloadTooLarge, NotReady,
                                          ModelLoadError)}


@dataclass(frozen=True)
class LaunchConfig:
    """Where this node's processes sit in the job: N processes here, ``nnodes`` nodes in all."""

    num_processes: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # single node: torchrun --standalone picks a free port

    @property
    def world_size(self) -> int:
        return self.num_processes * self.nnodes


def pop_launch_options(kwargs: dict) -> LaunchConfig | None:
    """Take the launch keys out of llm.train's options; None means: train in this process."""
    given = {key: kwargs.pop(key) for key in LAUNCH_KEYS if key in kwargs}
    given = {key: value for key, value in given.items() if value is not None}
    for key in ("num_processes", "nnodes"):
        given[key] = _whole(key, given.get(key, 1), minimum=1)
    if given["num_processes"] == 1 and given["nnodes"] == 1:
        extra = sorted(set(given) - {"num_processes", "nnodes"})
        if extra:
            raise InvalidInput(f"{', '.join(extra)} only apply to a multi-process run; pass num_processes > 1 "
                               "or nnodes > 1.")
        return None
    given["node_rank"] = _whole("node_rank", given.get("node_rank", 0), minimum=0)
    if given["node_rank"] >= given["nnodes"]:
        raise InvalidInput(f"node_rank {given['node_rank']} must be below nnodes {given['nnodes']} (0 is the master).")
    if "master_port" in given:
        given["master_port"] = _whole("master_port", given["master_port"], minimum=1)
        if given["master_port"] > 65535:
            raise InvalidInput(f"master_port must be a TCP port (1-65535), got {given['master_port']}.")
    if given["nnodes"] > 1 and ("master_addr" not in given or "master_port" not in given):
        raise InvalidInput("A multi-node run (nnodes > 1) needs master_addr and master_port: the address of "
                           "node 0 that every node can reach, and a free port on it.")
    address = given.get("master_addr", "127.0.0.1")
    if not isinstance(address, str) or not address.strip() or any(c.isspace() for c in address):
        raise InvalidInput(f"master_addr must be a host name or IP address, got {address!r}.")
    given["master_addr"] = address
    return LaunchConfig(**given)


def _whole(key: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInput(f"{key} must be a whole number >= {minimum}, got {value!r}.")
    return value


def launch_command(config: LaunchConfig, spec_path: Path) -> list[str]:
    """The torchrun command line that runs the worker ``config.num_processes`` times on this node."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(config.num_processes)]
    if config.nnodes == 1:
        command.append("--standalone")  # a local rendezvous on a free port: no port clash between runs
    else:
        command += ["--nnodes", str(config.nnodes), "--node_rank", str(config.node_rank),
                    "--master_addr", config.master_addr, "--master_port", str(config.master_port)]
    return command + ["--max_restarts", "0", "-m", "llm_module.training.worker", "--spec", str(spec_path)]


def worker_env(config: LaunchConfig, on_cuda: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment (``base``, else this process's): the CPU cores shared out among this
    node's processes."""
    env = {**(base if base is not None else os.environ), "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in env:  # torchrun would set 1; on CPU that leaves cores idle when N < cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(1 if on_cuda else max(1, cores // config.num_processes))
    return env


def train_distributed(config: LaunchConfig, *, setup_args: dict, base_model_name: str, data_file: Path,
                      output_dir: Path, training_params: dict | None, resume_from_checkpoint: bool | str,
                      progress: Callable[[dict], None], cancel: threading.Event, show_progress: bool = False,
                      env: dict[str, str] | None = None, **kwargs) -> dict:
    """Run ``train_adapter`` as a torchrun job of ``config``; return rank 0's result (as a local run's).
    Its options and training_params were checked by the caller (engine/training_runs.py) before any launch."""
    spec = {
        "setup_args": setup_args, "base_model_name": base_model_name, "data_file": str(data_file),
        "output_dir": str(output_dir), "training_params": training_params,
        "resume_from_checkpoint": resume_from_checkpoint, "train_options": kwargs, "launch": asdict(config),
    }
    with tempfile.TemporaryDirectory(prefix="llm-train-") as scratch:
        spec_path = Path(scratch) / "spec.json"
        try:
            spec_path.write_text(json.dumps(spec), encoding="utf-8")
        except TypeError as exc:
            raise InvalidInput(f"A multi-process run passes its options as JSON; one is not: {exc}") from exc
        command = launch_command(config, spec_path)
        progress({"state": "launching", "world_size": config.world_size, "num_processes": config.num_processes,
                  "nnodes": config.nnodes, "node_rank": config.node_rank})
        log.info("Launching %s", " ".join(command))
        run = _LaunchedRun(command, worker_env(config, _on_cuda(setup_args), env), progress, show_progress)
        return run.wait(cancel, config)


def _on_cuda(setup_args: dict) -> bool:
    from ..loader import resolve_device

    return resolve_device(setup_args.get("device")).startswith("cuda")


class _LaunchedRun:
    """torchrun in its own session; its output read line by line; cancel by SIGTERM, then SIGKILL."""

    def __init__(self, command: list[str], env: dict, progress: Callable[[dict], None], show_progress: bool) -> None:
        self.progress = progress
        self.show_progress = show_progress
        self.ranks: dict[int, dict] = {}
        self.result: dict | None = None
        self.error: dict | None = None
        self.last_step = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)

    def wait(self, cancel: threading.Event, config: LaunchConfig) -> dict:
        reader = threading.Thread(target=self._read, name="llm-train-launch-reader", daemon=True)
        reader.start()
        while self.proc.poll() is None:
            if cancel.wait(0.2):
                self._terminate()
                break
        self.proc.wait()
        reader.join(timeout=10)
        if cancel.is_set():
            self.progress({"state": "cancelled"})
            return {"cancelled": True, "steps": self.last_step, "adapter_dir": None, "world_size": config.world_size,
                    "warnings": [], "ranks": sorted(self.ranks.values(), key=lambda r: r["rank"])}
        if self.error is not None:
            raise _rebuild_error(self.error)
        if self.proc.returncode != 0:
            raise LLMError(f"The {config.world_size}-process training job failed (torchrun exit code "
                           f"{self.proc.returncode}). Its last output:\n" + "\n".join(self.tail))
        if self.result is None:  # a node other than 0: rank 0 (elsewhere) writes and reports the adapter
            return {"cancelled": False, "adapter_dir": None, "node_rank": config.node_rank,
                    "world_size": config.world_size, "ranks": sorted(self.ranks.values(), key=lambda r: r["rank"])}
        return self.result

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(EVENT_PREFIX):
                self._handle(json.loads(line[len(EVENT_PREFIX):]))
            elif line:
                self.tail.append(line)
                log.debug("%s", line)

    def _handle(self, event: dict) -> None:
        kind = event.pop("event")
        if kind == "rank":
            self.ranks[event["rank"]] = event
            self.progress({"ranks_started": len(self.ranks)})
        elif kind == "progress":
            self.last_step = event.get("step") or self.last_step
            self.progress(event)
            if self.show_progress and "step" in event:
                print(f"step {event['step']}/{event.get('total_steps')} loss {event.get('loss')} "
                      f"tokens/s {event.get('tokens_per_s')}", file=sys.stderr, flush=True)
        elif kind == "result":
            self.result = event["result"]
        elif kind == "error":
            self.error = event["error"]

    def _terminate(self) -> None:
        """SIGTERM torchrun (it forwards the signal to its workers); SIGKILL whatever outlives the grace."""
        self._signal_all(signal.SIGTERM)
        try:
            self.proc.wait(timeout=TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            self._signal_all(signal.SIGKILL)
        for info in self.ranks.values():  # workers run in sessions of their own: make sure none is left
            _kill_quietly(info["pid"], signal.SIGKILL, group=False)

    def _signal_all(self, sig: int) -> None:
        _kill_quietly(self.proc.pid, sig, group=True)


def _kill_quietly(pid: int, sig: int, *, group: bool) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _rebuild_error(error: dict) -> LLMError:
    """The worker's deliberate error as the same type here, so callers see a 4xx as a 4xx."""
    return _ERROR_TYPES.get(error.get("type"), LLMError)(error.get("message") or "Distributed training failed.")
