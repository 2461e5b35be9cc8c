"""The micro-batcher: batches what queued up, runs calls alone, and lets its worker end when idle."""

from __future__ import annotations

import threading
import time

import pytest

from llm_module.batching import MicroBatcher, Unfinished


def _batcher(**kwargs) -> tuple[MicroBatcher, list]:
    seen: list = []

    def run_batch(items):
        seen.append((list(items), threading.current_thread()))
        time.sleep(0.05)  # long enough for later submissions to queue up behind this batch
        return [item * 10 for item in items]

    return MicroBatcher(run_batch, key=lambda item: item % 2, **kwargs), seen


def test_queued_items_of_one_key_share_a_batch():
    batcher, seen = _batcher()
    futures = [batcher.submit(i) for i in (2, 4, 6, 1)]
    assert [f.result(timeout=10) for f in futures] == [20, 40, 60, 10]
    assert [2] in [items for items, _ in seen]  # the first ran alone, at once
    assert [4, 6] in [items for items, _ in seen]  # the even ones that queued meanwhile ran together
    batcher.stop()


def test_the_worker_ends_when_idle_and_the_next_request_starts_another():
    batcher, seen = _batcher(idle_exit_s=0.1)
    assert batcher.submit(2).result(timeout=10) == 20
    first_worker = seen[-1][1]
    first_worker.join(timeout=5)
    assert not first_worker.is_alive()  # its OpenMP team, if any, went with it
    assert batcher.submit(4).result(timeout=10) == 40
    assert seen[-1][1] is not first_worker and batcher.workers_started == 2
    batcher.stop()


def test_a_call_runs_on_the_worker_after_what_was_queued():
    batcher, seen = _batcher()
    first = batcher.submit(2)
    second = batcher.submit(4)
    call = batcher.submit_call(lambda: (threading.current_thread(), [items for items, _ in seen]))
    thread, batches_before = call.result(timeout=10)
    assert thread is seen[0][1] and [4] in batches_before
    assert (first.result(), second.result()) == (20, 40)
    with pytest.raises(ZeroDivisionError):
        batcher.submit_call(lambda: 1 / 0).result(timeout=10)
    batcher.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.submit(1)


def _callers(batcher: MicroBatcher, calls: int, count: int) -> None:
    """``count`` threads each submitting ``calls`` items back to back; caller 0 starts first."""
    def caller(index: int) -> None:
        for i in range(calls):
            batcher.submit(2 * (index + count * i)).result(timeout=10)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(count)]
    threads[0].start()
    time.sleep(0.01)  # caller 0's first request runs alone; the others queue behind it
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.mark.parametrize("rejoin_s", [0.0, 0.5])
def test_callers_coming_back_ride_in_one_batch(rejoin_s):
    """Without the rejoin wait, concurrent callers stay split into a batch of one and a batch of the rest."""
    batcher, seen = _batcher(rejoin_s=rejoin_s)
    _callers(batcher, calls=3, count=4)
    sizes = [len(items) for items, _ in seen]
    if rejoin_s:
        # The 3 that queued behind caller 0's first call wait for it to come back; the last
        # batch waits out the window for a caller that has finished.
        assert sizes == [1, 4, 4, 3]
    else:
        assert sizes[:2] == [1, 3] and 1 in sizes[2:] and 4 not in sizes
    batcher.stop()


def test_a_lone_caller_never_waits_for_the_rejoin_window():
    started: list[float] = []
    batcher = MicroBatcher(lambda items: started.append(time.monotonic()) or items, key=lambda item: 0, rejoin_s=5.0)
    for i in range(3):
        submitted = time.monotonic()
        assert batcher.submit(i).result(timeout=10) == i
        assert started[-1] - submitted < 1.0  # the last batch answered one request, and it is back
    batcher.stop()


def test_a_batch_that_yields_hands_its_remainder_to_the_next_batch_with_the_newcomers():
    seen: list = []

    def run_batch(items):
        seen.append(list(items))
        if items == [1]:  # the lone first item yields once two more are waiting
            deadline = time.monotonic() + 10
            while batcher.waiting(0) < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            return [Unfinished(101)]
        return [item * 10 for item in items]

    batcher = MicroBatcher(run_batch, key=lambda item: 0)
    first = batcher.submit(1)
    while not seen:
        time.sleep(0.001)
    later = [batcher.submit(i) for i in (2, 3)]
    assert first.result(timeout=10) == 1010 and [f.result(timeout=10) for f in later] == [20, 30]
    assert seen == [[1], [101, 2, 3]] and batcher.resumed == 1
    assert batcher.waiting(0) == 0
    batcher.stop()


def test_stopping_with_a_remainder_in_hand_fails_its_caller_instead_of_hanging():
    def run_batch(items):
        threading.Thread(target=batcher.stop).start()
        time.sleep(0.1)  # stop() has begun: the worker ends after this batch
        return [Unfinished(items[0] + 100)]

    batcher = MicroBatcher(run_batch, key=lambda item: 0)
    with pytest.raises(RuntimeError, match="stopped before this request finished"):
        batcher.submit(1).result(timeout=10)
