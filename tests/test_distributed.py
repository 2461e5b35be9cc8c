"""llm.train(num_processes=2): a torchrun job of 2 CPU processes (gloo) on the tiny model; launch options; cancel."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from llm_module.cli import build_parser
from llm_module.engine import Engine
from llm_module.engine.state import StateFile
from llm_module.errors import InvalidInput
from llm_module.training.distributed import LaunchConfig, launch_command, pop_launch_options

FAST = {"MICRO_BATCH_SIZE": 4, "BATCH_SIZE": 4, "EPOCHS": 1, "LEARNING_RATE": 5e-2, "CUTOFF_LEN": 128,
        "LORA_R": 4, "LORA_ALPHA": 8}
EXAMPLES = 16  # 2 processes x 2 examples per micro-batch x 4 steps


def write_catalog(path: Path, n: int = EXAMPLES) -> Path:
    records = [{"instruction": f"What is the code of item {i}?", "input": "", "output": f"Item {i} has code Z{i}."}
               for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    engine = Engine(state_file=StateFile(tmp_path_factory.mktemp("state") / "state.json"))
    engine.setup(str(tiny_model_dir))
    yield engine
    engine.close()


def wait_for(job_id: str, engine: Engine, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = engine.job_status(job_id)
        if status["state"] not in ("queued", "running", "cancelling"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {status['state']} after {timeout} s: {status['progress']}")


# ------------------------------------------------------------------ launch options (no process started)
def test_one_process_stays_in_process():
    options = {"num_processes": 1, "seed": 3}
    assert pop_launch_options(options) is None
    assert options == {"seed": 3}  # the launch keys never reach train_adapter's option check


@pytest.mark.parametrize("options, message", [
    ({"num_processes": 0}, "num_processes"),
    ({"num_processes": True}, "num_processes"),
    ({"num_processes": "2"}, "num_processes"),
    ({"num_processes": 1, "master_port": 29500}, "only apply to a multi-process run"),
    ({"num_processes": 2, "nnodes": 2}, "needs master_addr and master_port"),
    ({"nnodes": 2, "node_rank": 2, "master_addr": "10.0.0.1", "master_port": 29500}, "node_rank 2 must be below"),
    ({"num_processes": 2, "master_port": 70000}, "TCP port"),
    ({"num_processes": 2, "master_addr": "a b"}, "master_addr"),
])
def test_bad_launch_options_are_refused(options, message):
    with pytest.raises(InvalidInput, match=message):
        pop_launch_options(dict(options))


def test_single_node_launch_is_standalone_and_multi_node_names_the_master():
    single = launch_command(LaunchConfig(num_processes=2), Path("/s.json"))
    assert single[1:7] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "--max_restarts"]
    assert single[-4:] == ["-m", "llm_module.training.worker", "--spec", "/s.json"]
    config = pop_launch_options({"num_processes": 4, "nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.5",
                                 "master_port": 29555})
    assert config.world_size == 8
    multi = " ".join(launch_command(config, Path("/s.json")))
    assert "--nproc_per_node 4 --nnodes 2 --node_rank 1 --master_addr 10.0.0.5 --master_port 29555" in multi
    assert "--standalone" not in multi


def test_cli_train_takes_the_launch_flags():
    args = build_parser().parse_args(["train", "d.jsonl", "out", "--num-processes", "2", "--nnodes", "2",
                                      "--node-rank", "1", "--master-addr", "node0", "--master-port", "29500"])
    assert (args.num_processes, args.nnodes, args.node_rank, args.master_addr, args.master_port) == (
        2, 2, 1, "node0", 29500)


# ------------------------------------------------------------------ real 2-process runs
def test_two_processes_train_together_and_the_adapter_serves(engine, tmp_path):
    data = write_catalog(tmp_path / "catalog.jsonl")
    started = engine.train(str(data), str(tmp_path / "ddp"), FAST, num_processes=2, background=True)
    status = wait_for(started["job_id"], engine)
    assert status["state"] == "done", status["error"] or status["progress"]
    result = status["result"]
    assert status["progress"]["world_size"] == 2 and status["progress"]["ranks_started"] == 2
    assert status["progress"]["step"] == result["steps"] == 4  # rank 0's progress reached the job

    log = json.loads((tmp_path / "ddp" / "training_log.json").read_text())
    assert log["world_size"] == 2 and [r["rank"] for r in log["ranks"]] == [0, 1]
    assert len({r["pid"] for r in log["ranks"]}) == 2
    # Each rank ran half of the micro-batches: the data was split between them, not duplicated.
    assert [r["micro_batches"] for r in log["ranks"]] == [4, 4]
    assert all(r["tokens"] > 0 for r in log["ranks"])
    assert sum(r["tokens"] for r in log["ranks"]) == result["train_tokens"]

    # Loaded live, under the run's folder name, and it changes generation like any adapter.
    assert result["adapter"] == "ddp" and "ddp" in [a["name"] for a in engine.list_adapters()]
    prompt = "What is the code of item 3?"
    tuned = engine.generate(prompt, adapter="ddp", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    base = engine.generate(prompt, adapter="base", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert tuned != base

    # Same adapter format as a 1-process run of the same recipe, and the same number of optimizer steps.
    local = engine.train(str(data), str(tmp_path / "local"), FAST, show_progress=False)
    ddp_final, local_final = tmp_path / "ddp" / "final", tmp_path / "local" / "final"
    assert sorted(p.name for p in ddp_final.iterdir()) == sorted(p.name for p in local_final.iterdir())
    assert adapter_config(ddp_final) == adapter_config(local_final)
    assert tensor_shapes(ddp_final) == tensor_shapes(local_final)
    assert local["steps"] == result["steps"]
    # The first step runs the untouched base (LoRA B starts at 0) on a same-size batch: the losses agree, so
    # the DDP loss is neither halved nor doubled by how tokens are counted across ranks.
    first_ddp, first_local = (json.loads((tmp_path / run / "training_log.json").read_text())["steps"][0]["loss"]
                              for run in ("ddp", "local"))
    assert first_ddp == pytest.approx(first_local, rel=0.1)
    # Only rank 0 wrote: one final/, no leftover temporary folders from a second writer.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.name.startswith(".")) == []


def adapter_config(adapter_dir: Path) -> dict:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])  # peft saves a set: its order varies by process
    return config


def tensor_shapes(adapter_dir: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as weights:
        return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}


def test_cancel_stops_every_process_and_writes_no_adapter(engine, tmp_path):
    data = write_catalog(tmp_path / "catalog.jsonl", n=64)
    long_run = {**FAST, "EPOCHS": 50}
    started = engine.train(str(data), str(tmp_path / "run"), long_run, num_processes=2, background=True)
    deadline = time.monotonic() + 600
    while (engine.job_status(started["job_id"])["progress"].get("step") or 0) < 2:
        assert time.monotonic() < deadline and engine.job_status(started["job_id"])["state"] == "running"
        time.sleep(0.3)
    engine.cancel_job(started["job_id"])
    status = wait_for(started["job_id"], engine, timeout=120)
    assert status["state"] == "cancelled" and status["result"]["cancelled"] is True
    assert status["result"]["steps"] < 50 * 8
    assert not (tmp_path / "run" / "final").exists()
    assert "run" not in [a["name"] for a in engine.list_adapters()]
    for rank in status["result"]["ranks"]:  # no worker outlives the cancel
        assert not pid_alive(rank["pid"]), rank


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not reaped by torchrun, which is gone) is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
