"""DynamicBatcher against a recording stand-in for the model: batching, failures, limits, drain."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gradcam_server.batching import BatchStats, DynamicBatcher, StopSignal
from gradcam_server.errors import DeadlineExceeded, QueueFull, ShuttingDown

LONG_DELAY_US = 10_000_000  # longer than any test: a batch goes out only when full or closing
WAIT_S = 5.0  # upper bound on any wait, so a broken batcher fails a test instead of hanging it


class Model:
    """``run_batch`` stand-in: records every batch and answers ``item * 10`` per item.

    With ``hold=True`` each call blocks until `release()`, so a test can keep a batch in flight.
    """

    def __init__(self, *, hold: bool = False, fail_on: object = None) -> None:
        self.batches: list[list[object]] = []
        self.called_at: list[float] = []
        self.thread_ids: set[int] = set()
        self.entered = threading.Event()
        self.fail_on = fail_on
        self._gate = threading.Event()
        if not hold:
            self._gate.set()

    def __call__(self, items: list[int], stop: StopSignal | None = None) -> list[int]:
        self.batches.append(list(items))
        self.called_at.append(time.monotonic())
        self.thread_ids.add(threading.get_ident())
        self.entered.set()
        self._gate.wait(WAIT_S)
        if self.fail_on in items:
            raise ValueError(f"cannot run {self.fail_on!r}")
        return [item * 10 for item in items]

    def release(self) -> None:
        self._gate.set()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT_S), "run_batch was never called"


def make_batcher(
    model: object, *, max_batch_size: int = 8, delay_us: int = LONG_DELAY_US,
    max_queue_size: int = 64, stats: list[BatchStats] | None = None, name: str = "",
) -> DynamicBatcher[int, int]:
    return DynamicBatcher(
        model,
        max_batch_size=max_batch_size,
        max_queue_delay_microseconds=delay_us,
        max_queue_size=max_queue_size,
        name=name,
        on_batch=None if stats is None else stats.append,
    )


def run(coroutine) -> object:
    return asyncio.run(asyncio.wait_for(coroutine, WAIT_S))


def test_concurrent_requests_coalesce_into_one_full_batch_dispatched_at_once():
    model, stats = Model(), []
    batcher = make_batcher(model, max_batch_size=4, stats=stats)

    async def scenario():
        start = time.monotonic()
        results = await asyncio.gather(*(batcher.submit(item) for item in (1, 2, 3, 4)))
        elapsed = time.monotonic() - start
        await batcher.close()
        return results, elapsed

    results, elapsed = run(scenario())
    assert results == [10, 20, 30, 40]
    assert model.batches == [[1, 2, 3, 4]]
    assert elapsed < 1.0  # full: not held for the 10 s delay
    (batch,) = stats
    assert (batch.rows, batch.requests, batch.failed) == (4, 4, False)
    assert len(batch.queue_seconds) == 4 and batch.run_seconds >= 0


def test_batch_rows_never_exceed_max_batch_size_and_oversized_requests_run_alone():
    model, stats = Model(), []
    batcher = make_batcher(model, max_batch_size=4, delay_us=20_000, stats=stats)

    async def scenario():
        sized = [(1, 2), (2, 2), (3, 3), (4, 1), (5, 1), (6, 6), (7, 1)]
        results = await asyncio.gather(*(batcher.submit(item, size) for item, size in sized))
        await batcher.close()
        return results

    assert run(scenario()) == [10, 20, 30, 40, 50, 60, 70]
    assert model.batches == [[1, 2], [3, 4], [5], [6], [7]]
    assert [batch.rows for batch in stats] == [4, 4, 1, 6, 1]


def test_lone_request_waits_for_the_queue_delay():
    model, stats = Model(), []
    batcher = make_batcher(model, delay_us=100_000, stats=stats)

    async def scenario():
        submitted_at = time.monotonic()
        result = await batcher.submit(7)
        await batcher.close()
        return result, model.called_at[0] - submitted_at

    result, waited = run(scenario())
    assert result == 70
    assert 0.09 <= waited < 1.0
    assert 0.09 <= stats[0].queue_seconds[0] < 1.0


def test_failed_batch_fails_only_its_own_requests():
    model, stats = Model(fail_on=2), []
    batcher = make_batcher(model, max_batch_size=2, stats=stats)

    async def scenario():
        results = await asyncio.gather(
            *(batcher.submit(item) for item in (1, 2, 3, 4)), return_exceptions=True
        )
        await batcher.close()
        return results

    first, second, third, fourth = run(scenario())
    assert isinstance(first, ValueError) and second is first
    assert str(first) == "cannot run 2"
    assert (third, fourth) == (30, 40)
    assert model.batches == [[1, 2], [3, 4]]
    assert [batch.failed for batch in stats] == [True, False]


def test_wrong_number_of_results_fails_the_whole_batch():
    batches = []

    def drops_the_last(items: list[int], stop: StopSignal) -> list[int]:
        batches.append(items)
        return items[:-1]

    batcher = make_batcher(drops_the_last, max_batch_size=2)

    async def scenario():
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        await batcher.close()
        return results

    results = run(scenario())
    assert batches == [[1, 2]]
    for result in results:
        assert isinstance(result, RuntimeError)
        assert "1 results for 2 requests" in str(result)


def test_full_queue_refuses_at_once_while_queued_requests_still_complete():
    model = Model(hold=True)
    batcher = make_batcher(model, max_batch_size=1, max_queue_size=2, name="resnet")

    async def scenario():
        running = asyncio.create_task(batcher.submit(0))
        await model.wait_entered()  # 0 is dispatched: no longer pending
        queued = [asyncio.create_task(batcher.submit(item)) for item in (1, 2)]
        await asyncio.sleep(0)
        assert batcher.pending == 2
        with pytest.raises(QueueFull, match=r"'resnet' queue is full \(2 pending\); retry later"):
            await batcher.submit(3)
        model.release()
        results = await asyncio.gather(running, *queued)
        await batcher.close()
        return results

    assert run(scenario()) == [0, 10, 20]
    assert model.batches == [[0], [1], [2]]


def test_expired_deadline_is_never_run():
    model = Model(hold=True)
    batcher = make_batcher(model, max_batch_size=1)

    async def scenario():
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(9, deadline=time.monotonic() - 1)
        running = asyncio.create_task(batcher.submit(0))
        await model.wait_entered()
        expiring = asyncio.create_task(batcher.submit(1, deadline=time.monotonic() + 0.05))
        await asyncio.sleep(0.1)  # expires while 0 holds the model
        model.release()
        assert await running == 0
        with pytest.raises(DeadlineExceeded):
            await expiring
        await batcher.close()

    run(scenario())
    assert model.batches == [[0]]


def test_cancelled_submit_is_withdrawn_and_never_run():
    model = Model(hold=True)
    batcher = make_batcher(model, max_batch_size=1)

    async def scenario():
        running = asyncio.create_task(batcher.submit(0))
        await model.wait_entered()
        abandoned = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0)
        assert batcher.pending == 1
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        assert batcher.pending == 0
        later = asyncio.create_task(batcher.submit(2))
        model.release()
        results = await asyncio.gather(running, later)
        await batcher.close()
        return results

    assert run(scenario()) == [0, 20]
    assert model.batches == [[0], [2]]


def test_close_drains_running_and_queued_work_then_refuses_new_work():
    model = Model(hold=True)
    batcher = make_batcher(model, max_batch_size=1)

    async def scenario():
        running = asyncio.create_task(batcher.submit(0))
        await model.wait_entered()
        queued = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.05)
        assert not closing.done()
        with pytest.raises(ShuttingDown):
            await batcher.submit(2)
        model.release()
        await closing  # the 10 s queue delay is not waited for
        assert running.done() and queued.done()
        with pytest.raises(ShuttingDown):
            await batcher.submit(3)
        return running.result(), queued.result()

    assert run(scenario()) == (0, 10)
    assert model.batches == [[0], [1]]


def test_run_batch_runs_off_the_event_loop_thread():
    model = Model()
    batcher = make_batcher(model, delay_us=0)

    async def scenario():
        await asyncio.gather(*(batcher.submit(item) for item in range(20)))
        await batcher.close()

    run(scenario())
    assert model.thread_ids and threading.get_ident() not in model.thread_ids


def test_failing_on_batch_callback_does_not_fail_requests():
    def broken_metrics(stats: BatchStats) -> None:
        raise RuntimeError("metrics backend down")

    batcher = DynamicBatcher(
        Model(), max_batch_size=2, max_queue_delay_microseconds=0, max_queue_size=4,
        on_batch=broken_metrics,
    )

    async def scenario():
        results = await asyncio.gather(batcher.submit(1), batcher.submit(2))
        await batcher.close()
        return results

    assert run(scenario()) == [10, 20]


class Stoppable:
    """``run_batch`` stand-in that runs until told to stop (or WAIT_S), recording whether the
    stop signal arrived."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.stopped = threading.Event()
        self.returned_at: float | None = None

    def __call__(self, items: list[int], stop: StopSignal) -> list[int]:
        self.entered.set()
        stop.add_callback(self.stopped.set)
        self.stopped.wait(WAIT_S)
        self.returned_at = time.monotonic()
        return [item * 10 for item in items]


def test_a_batch_every_request_abandoned_is_told_to_stop():
    model, stats = Stoppable(), []
    batcher = make_batcher(model, delay_us=0, stats=stats)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(1))
        second = asyncio.ensure_future(batcher.submit(2))
        assert await asyncio.to_thread(model.entered.wait, WAIT_S)
        first.cancel()
        await asyncio.sleep(0.05)
        assert not model.stopped.is_set()  # the second request still waits for the batch
        cancelled_at = time.monotonic()
        second.cancel()
        assert await asyncio.to_thread(model.stopped.wait, WAIT_S)
        await batcher.close()
        return cancelled_at

    cancelled_at = run(scenario())
    assert model.returned_at - cancelled_at < 0.5
    assert stats[0].stopped and stats[0].requests == 2


def test_a_running_batch_whose_deadlines_all_passed_answers_at_once_and_stops():
    model, stats = Stoppable(), []
    batcher = make_batcher(model, delay_us=0, stats=stats)

    async def scenario():
        deadline = time.monotonic() + 0.2
        started = time.monotonic()
        results = await asyncio.gather(
            batcher.submit(1, deadline=deadline), batcher.submit(2, deadline=deadline + 0.1),
            return_exceptions=True,
        )
        answered = time.monotonic() - started
        await batcher.close()
        return results, answered

    results, answered = run(scenario())
    assert all(isinstance(r, DeadlineExceeded) for r in results)
    assert "while it ran" in str(results[0])
    assert answered < 1.0  # not the WAIT_S the stand-in would otherwise run
    assert model.stopped.is_set() and stats[0].stopped


def test_a_batch_with_a_request_without_deadline_runs_to_the_end():
    model = Stoppable()
    batcher = make_batcher(model, delay_us=0)

    async def scenario():
        timed = asyncio.ensure_future(batcher.submit(1, deadline=time.monotonic() + 0.1))
        untimed = asyncio.ensure_future(batcher.submit(2))
        assert await asyncio.to_thread(model.entered.wait, WAIT_S)
        await asyncio.sleep(0.3)
        assert not model.stopped.is_set()
        model.stopped.set()  # let the stand-in finish
        results = await asyncio.gather(timed, untimed, return_exceptions=True)
        await batcher.close()
        return results

    timed, untimed = run(scenario())
    assert isinstance(timed, DeadlineExceeded) and untimed == 20


@pytest.mark.parametrize("instances", [1, 2])
def test_instances_bound_the_batches_run_at_once(instances: int) -> None:
    """With `instances` N, up to N batches of one batcher run at once (each formed as soon as
    an instance is free), never more; every request gets its own answer."""
    running = peak = 0
    lock = threading.Lock()

    def run_batch(items: list[int], stop: StopSignal) -> list[int]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return [item * 10 for item in items]

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(run_batch, max_batch_size=1, max_queue_delay_microseconds=0,
                                 max_queue_size=64, instances=instances)
        answers = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(i) for i in range(6))), WAIT_S)
        await batcher.close()
        return answers

    started = time.monotonic()
    assert asyncio.run(scenario()) == [i * 10 for i in range(6)]
    assert peak == instances
    assert time.monotonic() - started < 6 * 0.05 / instances + 0.25


def test_a_deadline_passing_in_one_of_two_running_batches_stops_only_that_batch() -> None:
    """Two batches in flight: the one whose only request's deadline passes is told to stop and
    its request gets DeadlineExceeded at once; the other runs to its answer."""
    stops: dict[int, StopSignal] = {}
    gate = threading.Event()

    def run_batch(items: list[int], stop: StopSignal) -> list[int]:
        stops[items[0]] = stop
        gate.wait(WAIT_S)
        return [item * 10 for item in items]

    async def scenario() -> tuple[object, object]:
        batcher = DynamicBatcher(run_batch, max_batch_size=1, max_queue_delay_microseconds=0,
                                 max_queue_size=8, instances=2)
        late = asyncio.ensure_future(batcher.submit(1, deadline=time.monotonic() + 0.2))
        kept = asyncio.ensure_future(batcher.submit(2))
        late_result = await asyncio.gather(late, return_exceptions=True)
        assert stops[1].is_set() and not stops[2].is_set()
        gate.set()
        kept_result = await asyncio.wait_for(kept, WAIT_S)
        await batcher.close()
        return late_result[0], kept_result

    late, kept = asyncio.run(scenario())
    assert isinstance(late, DeadlineExceeded) and kept == 20
