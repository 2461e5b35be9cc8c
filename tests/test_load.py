"""The server stays up under load (a short run of bench/load_test.py, the same rules as the full one).

60 greedy requests from 4 clients over the default model, mixing the base and two adapters, with a
training job started at request 10: every exception of a request is a failure, no answer may be
another adapter's, the job must finish ("done"), its adapter must answer in a mixed burst after it,
and resident memory at the end must be within 10 % of what it was after the warm-up. The full run
(2,000 requests, 8 clients) is in bench/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_a_short_load_test_passes_every_rule():
    from load_test import run_load

    figures = run_load(requests_count=60, clients=4, adapters=2, max_new_tokens=8, train_at=10, train_records=16,
                       job_timeout=600)
    failed = {name: rule["figure"] for name, rule in figures["rules"].items() if not rule["pass"]}
    assert figures["verdict"] == "PASS", (failed, figures["first_failure"])
    assert figures["failed_requests"] == 0 and figures["mixed_up"] == 0
    assert figures["training_job"]["state"] == "done"
    # every request was answered and judged: the 60, and the 8 of the burst after the job but the
    # trained adapter's 2 (one in 4: the trained adapter, the base model and the two others)
    assert int(figures["own_reference_match"].split("/")[1]) == 60 + 6
