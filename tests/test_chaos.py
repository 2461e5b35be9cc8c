"""Chaos under load, short (bench/chaos_soak.py; the long run and its figures are in bench/README.md).

Eight clients generate with random adapters and options, streamed and not, through /v1 and the OpenAI
API, while an admin client loads, unloads, sets the default, takes folders out of the shared adapters
folder and reloads, rewrites an adapter's files, evaluates, trains a short job and sets the model up
again. Every invariant of the soak must hold: no 5xx, nothing lost or hung, every refusal a clear
error, no answer from the wrong adapter, memory bounded, the admin's state as expected, the job done,
every adapter answering as before at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_a_short_chaos_soak_keeps_every_invariant(tmp_path):
    from chaos_soak import run_soak

    report = run_soak(seconds=30, workdir=tmp_path)
    failed = {name: rule["figure"] for name, rule in report["invariants"].items() if not rule["pass"]}
    assert report["ok"] and not failed, (failed, report["first_lost"], report["first_5xx"])
    assert report["answered"] > 50 and report["greedy_checked"] > 20  # the soak did serve, and was judged
    assert report["admin"]["cycles"] >= 1 and report["admin"]["jobs"]  # every kind of admin op ran
