"""One rank of a multi-process llm.train: ``python -m llm_module.training.worker --spec spec.json`` under torchrun.

Every rank loads the base model from the engine's setup args and calls the same
``train_adapter`` as an in-process run; Trainer reads torchrun's environment (RANK,
WORLD_SIZE, ...) and wraps the model in DDP. The parent reads the lines this module
prints with ``EVENT_PREFIX``: each rank announces itself, rank 0 reports progress and
the result. Rank 0 adds the world size and what every rank did to training_log.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from ..errors import LLMError
from ..paths import atomic_write_text
from .distributed import EVENT_PREFIX

log = logging.getLogger("llm_module.training.worker")


def emit(event: str, **fields) -> None:
    print(EVENT_PREFIX + json.dumps({"event": event, **fields}, default=str), flush=True)


class RankActivity:
    """Counts the forward passes that train (one a micro-batch) and their tokens: proof this rank did its share."""

    def __init__(self, model) -> None:
        self.micro_batches = 0
        self.tokens = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        import torch

        # evaluation passes are not training work; nor are shared_start.py's no-grad passes (the start once, its check)
        if not module.training or not torch.is_grad_enabled():
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.micro_batches += 1
        self.tokens += int(mask.sum()) if mask is not None else int(ids.numel()) if ids is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, type=Path, help="the run's spec, written by training.distributed")
    spec = json.loads(parser.parse_args(argv).spec.read_text(encoding="utf-8"))
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"[rank {rank}/{world_size}] %(levelname)s %(name)s: %(message)s")
    emit("rank", rank=rank, local_rank=local_rank, world_size=world_size, host=socket.gethostname(), pid=os.getpid())
    log.info("rank %d of %d started (local rank %d, pid %d)", rank, world_size, local_rank, os.getpid())
    try:
        result = train_rank(spec, rank, local_rank, world_size)
    except LLMError as exc:
        log.error("%s", exc)
        if rank == 0:
            emit("error", error=exc.to_dict()["error"])
        return 1
    if rank == 0:
        emit("result", result=result)
    return 0


def train_rank(spec: dict, rank: int, local_rank: int, world_size: int) -> dict:
    import torch
    import torch.distributed as dist

    from ..loader import load_model, resolve_device
    from ..settings import Settings
    from .trainer import train_adapter

    setup = {k: v for k, v in spec["setup_args"].items() if k != "quantize"}  # training reads the float weights
    on_cuda = resolve_device(setup.get("device")).startswith("cuda")
    if on_cuda:  # one GPU per local rank
        torch.cuda.set_device(local_rank)
        setup["device"] = f"cuda:{local_rank}"
    loaded = load_model(**setup, models_dir=Settings().models_dir)  # the parent passed its folders (settings.py)
    activity = RankActivity(loaded.model)
    options = dict(spec["train_options"])
    warnings = _share_batch(options, spec["training_params"], world_size, "nccl" if on_cuda else "gloo")

    def report(progress: dict) -> None:
        emit("progress", **progress)

    output_dir = Path(spec["output_dir"])
    result = train_adapter(
        loaded.model, loaded.tokenizer, data_file=Path(spec["data_file"]), output_dir=output_dir,
        training_params=spec["training_params"], resume_from_checkpoint=spec["resume_from_checkpoint"],
        progress=report if rank == 0 else _ignore, cancel=threading.Event(), base_model_name=spec["base_model_name"],
        show_progress=False, **options,
    )
    mine = {"rank": rank, "local_rank": local_rank, "host": socket.gethostname(), "pid": os.getpid(),
            "device": str(next(loaded.model.parameters()).device), "threads": torch.get_num_threads(),
            "micro_batches": activity.micro_batches, "tokens": activity.tokens,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    ranks: list = [None] * world_size
    dist.all_gather_object(ranks, mine)
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return result
    result.update(world_size=world_size, ranks=ranks, warnings=result.get("warnings", []) + warnings)
    _add_to_training_log(output_dir / "training_log.json", world_size, ranks)
    return result


def _share_batch(options: dict, training_params: dict | None, world_size: int, backend: str) -> list[str]:
    """Split MICRO_BATCH_SIZE among the ranks, so the global batch and the step count match a 1-process run."""
    from .params import resolve_params

    micro = resolve_params(training_params).MICRO_BATCH_SIZE
    overrides = dict(options.get("training_args_kwargs") or {})
    overrides.setdefault("ddp_backend", backend)
    overrides.setdefault("ddp_find_unused_parameters", False)  # every LoRA weight is used: skip the graph walk
    warnings = []
    if "per_device_train_batch_size" not in overrides:
        if micro % world_size == 0:
            overrides["per_device_train_batch_size"] = micro // world_size
            overrides.setdefault("per_device_eval_batch_size", micro // world_size)
        else:
            warnings.append(f"MICRO_BATCH_SIZE {micro} is not a multiple of the {world_size} processes, so each "
                            f"process takes {micro} examples per micro-batch: the global batch is {world_size}x the "
                            "1-process one. Use a multiple to train with the same batch.")
    options["training_args_kwargs"] = overrides
    return warnings


def _add_to_training_log(path: Path, world_size: int, ranks: list[dict]) -> None:
    if not path.is_file():  # cancelled before the log was written
        return
    training_log = json.loads(path.read_text(encoding="utf-8"))
    training_log.update(world_size=world_size, ranks=ranks)
    training_log["result"].update(world_size=world_size)
    atomic_write_text(path, json.dumps(training_log, indent=1))


def _ignore(progress: dict) -> None:
    pass


if __name__ == "__main__":
    sys.exit(main())
