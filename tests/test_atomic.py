"""Atomic writes: a kill -9 at any moment of writing an adapter leaves the last good one loadable."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llm_module.adapter_files import find_adapter_dir
from llm_module.engine import Engine
from llm_module.paths import atomic_dir, recover_dir

WRITER = """
import shutil, sys, time
from pathlib import Path
from llm_module.paths import atomic_dir
source, final = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_dir(final) as tmp:
    for f in source.iterdir():
        shutil.copy(f, tmp / f.name)
        print("copied", f.name, flush=True)
        time.sleep(0.5)            # a slow disk: plenty of time to be killed mid-write
    (tmp / "adapter_model.safetensors").write_bytes(b"half-written garbage")
    print("writing", flush=True)
    time.sleep(30)
"""


def _loads(engine: Engine, path: Path, name: str) -> str:
    engine.load_adapter(str(path), name)
    text = engine.generate("Hi", adapter=name, do_sample=False, max_new_tokens=5)[0]["generated_text"]
    engine.unload_adapter(name)
    return text


def test_kill_during_write_leaves_the_previous_adapter(engine, tiny_adapter_dir, tmp_path):
    final = tmp_path / "run" / "final"
    shutil.copytree(tiny_adapter_dir, final)
    expected = _loads(engine, final, "before")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tiny_adapter_dir), str(final)],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("writing"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert _loads(engine, final, "after") == expected
    leftovers = [p.name for p in final.parent.iterdir() if p.name.startswith(".final.tmp-")]
    assert leftovers, "the writer really was killed mid-write"


def test_a_crash_between_the_two_renames_is_undone(engine, tiny_adapter_dir, tmp_path):
    final = tmp_path / "run" / "final"
    shutil.copytree(tiny_adapter_dir, final)
    expected = _loads(engine, final, "before")
    os.replace(final, final.with_name(".final.old"))  # the state a crash mid-swap leaves
    assert not final.exists()
    assert find_adapter_dir(final.parent) == final  # recovered on the next load
    assert _loads(engine, final.parent, "after") == expected


def test_failed_write_keeps_the_old_and_success_replaces_it(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("disk full")
    assert (final / "v").read_text() == "1"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    recover_dir(final)
    assert (final / "v").read_text() == "2"
