"""Dynamic batching: requests for one model are coalesced into batches run by one blocking call.

Contract of `DynamicBatcher(run_batch, *, max_batch_size, max_queue_delay_microseconds,
max_queue_size, executor=None, name="", on_batch=None, instances=1)`; names follow Triton's
dynamic batcher (and ``instances`` its instance_group count).

- Event loop: the batcher lives on the asyncio loop of its first `submit()` (the grpc.aio
  server's). The blocking ``run_batch(items, stop)`` (an onnxruntime call) runs off the loop, in
  ``executor`` (default: a private single-thread ThreadPoolExecutor; a server shares one among
  all its batchers, so their number does not multiply threads), at most ``instances``
  batches at a time per batcher (default one; the executor needs as many threads). A batch is
  formed whenever an instance is free.
- Requests: ``await submit(item, size=1, deadline=None)`` queues an opaque ``item`` carrying
  ``size`` batch rows (e.g. 3 images) and returns its own result.
- Forming a batch: queued requests are taken in FIFO order while the sum of their sizes stays
  <= ``max_batch_size``; a request larger than ``max_batch_size`` runs alone in its own batch
  (whether to allow one is the caller's decision). The batcher waits at most
  ``max_queue_delay_microseconds`` after the oldest queued request arrived for more to come, and
  dispatches at once when the batch is full (the next request would not fit) or on close().
- Results: ``run_batch`` returns exactly one result per item, in order; each submit() gets its
  own. If ``run_batch`` raises, every request of that batch re-raises that exception and no other
  batch is affected. A wrong number of results fails every request of the batch with
  RuntimeError.
- Queue bound: at most ``max_queue_size`` requests wait to be dispatched (`pending`); submit()
  beyond that raises `QueueFull` at once.
- Deadlines: ``deadline`` is an absolute `time.monotonic()` value. A request whose deadline has
  passed at submit() or when its batch is formed is never run: submit() raises
  `DeadlineExceeded`.
- Cancellation: if the task awaiting submit() is cancelled (the client cancelled the RPC) while
  the request is queued, the request is removed and never run; the cancellation propagates.
- Abandoned work stops: ``stop`` (a `StopSignal`) is set while ``run_batch`` runs once no
  request of the batch waits for it any more: each was cancelled, or its deadline passed (a
  request gets `DeadlineExceeded` at its deadline, without waiting for the run). ``run_batch``
  hooks its runtime's own stop onto it (onnxruntime's ``RunOptions.terminate``); what it
  returns or raises afterwards is dropped. A batch in which one request still waits runs to
  the end.
- Shutdown: once `close()` starts, submit() raises `ShuttingDown`; close() dispatches what is
  queued without waiting for the delay and returns when queued and running batches are done.
- Metrics: ``on_batch(BatchStats)`` is called after every dispatched batch, failed and stopped
  ones too; an exception it raises is logged and never reaches a request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import DeadlineExceeded, QueueFull, ShuttingDown

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchStats:
    """What one dispatched batch did, for metrics."""

    rows: int  # batch size in rows: the sum of the requests' sizes
    requests: int
    queue_seconds: tuple[float, ...]  # per request, in batch order: from submit() to dispatch
    run_seconds: float  # from dispatch until run_batch returned or raised
    failed: bool  # run_batch raised or returned the wrong number of results
    stopped: bool = False  # abandoned by every request while it ran, and told to stop


class StopSignal:
    """Set once, from any thread; callbacks added before run when it is set, those added
    after run at once. Thread-safe: the event loop sets it while a worker thread runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._callbacks: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._set:
                self._callbacks.append(callback)
                return
        callback()


@dataclass(eq=False)  # identity equality: a request is removed from the queue as itself
class _Request:
    item: Any
    size: int
    deadline: float | None
    future: asyncio.Future[Any]
    submitted_at: float = field(default_factory=time.monotonic)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and self.deadline <= now


@dataclass(eq=False)
class _Running:
    """A dispatched batch: its requests, its stop signal, and the timer of its next deadline."""

    batch: list[_Request]
    stop: StopSignal
    expiry: asyncio.TimerHandle | None = None


class DynamicBatcher(Generic[T, R]):
    """Coalesces concurrent `submit()` calls into batches for ``run_batch``; see the module."""

    def __init__(
        self,
        run_batch: Callable[[list[T], StopSignal], Sequence[R]],
        *,
        max_batch_size: int,
        max_queue_delay_microseconds: int,
        max_queue_size: int,
        executor: concurrent.futures.Executor | None = None,
        name: str = "",
        on_batch: Callable[[BatchStats], None] | None = None,
        instances: int = 1,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_microseconds < 0:
            raise ValueError(
                f"max_queue_delay_microseconds must be >= 0, got {max_queue_delay_microseconds}"
            )
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_microseconds = max_queue_delay_microseconds
        self.max_queue_size = max_queue_size
        self._run_batch = run_batch
        self._on_batch = on_batch
        self._max_delay_seconds = max_queue_delay_microseconds / 1e6
        self.instances = instances
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=instances, thread_name_prefix=f"batcher-{name}" if name else "batcher"
        )
        self._queue: collections.deque[_Request] = collections.deque()
        self._changed = asyncio.Event()  # set on every submit, withdrawal and close
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._running: list[_Running] = []  # the batches dispatched and not done, oldest first

    @property
    def pending(self) -> int:
        """Requests queued and not yet dispatched."""
        return len(self._queue)

    async def submit(self, item: T, size: int = 1, deadline: float | None = None) -> R:
        """Queue ``item`` (``size`` rows) and return its result from ``run_batch``.

        Raises `ShuttingDown` after close() started, `QueueFull` when `pending` is at
        ``max_queue_size``, `DeadlineExceeded` when ``deadline`` passes before its batch is formed,
        and whatever ``run_batch`` raised for its batch.
        """
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if self._closing:
            raise ShuttingDown(f"{self._subject()} is shutting down; retry on another server")
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(
                f"{self._subject()} queue is full ({len(self._queue)} pending); retry later"
            )
        loop = asyncio.get_running_loop()
        request = _Request(item, size, deadline, loop.create_future())
        self._queue.append(request)
        if self._worker is None:
            self._worker = loop.create_task(self._work(), name=f"{self._subject()} batcher")
        self._changed.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._withdraw(request)
            self._stop_if_abandoned()
            raise

    async def close(self) -> None:
        """Take no new work; return once every queued and running batch is done."""
        self._closing = True
        self._changed.set()
        if self._worker is not None:
            await asyncio.shield(self._worker)
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    def _subject(self) -> str:
        return f"model {self.name!r}" if self.name else "model"

    def _stop_if_abandoned(self) -> None:
        """Stop each running batch once none of its requests waits for it."""
        for running in self._running:
            if all(request.future.done() for request in running.batch):
                running.stop.set()

    def _expire_running(self, running: _Running) -> None:
        """Answer the running batch's requests whose deadline has passed, then wait for the
        next deadline among those still waiting."""
        running.expiry = None
        if running not in self._running:
            return
        now = time.monotonic()
        for request in running.batch:
            if not request.future.done() and request.expired(now):
                request.future.set_exception(
                    DeadlineExceeded("the request's deadline passed while it ran")
                )
        self._stop_if_abandoned()
        self._arm_expiry(running)

    def _arm_expiry(self, running: _Running) -> None:
        waiting = [r.deadline for r in running.batch if not r.future.done() and r.deadline]
        if waiting and running.expiry is None:
            delay = max(min(waiting) - time.monotonic(), 0.0)
            running.expiry = asyncio.get_running_loop().call_later(
                delay, self._expire_running, running
            )

    def _withdraw(self, request: _Request) -> None:
        if request in self._queue:
            self._queue.remove(request)
            self._changed.set()

    async def _work(self) -> None:
        dispatched: set[asyncio.Task] = set()
        while True:
            dispatched = {task for task in dispatched if not task.done()}
            if not self._queue or len(dispatched) >= self.instances:
                if self._closing and not self._queue:
                    await asyncio.gather(*dispatched)
                    return
                self._changed.clear()
                await self._changed.wait()  # a submit, a withdrawal, close(), a batch done
                continue
            await self._wait_until_full_or_due()
            batch = self._take_batch()
            if batch:
                dispatched.add(asyncio.get_running_loop().create_task(self._dispatch(batch)))

    async def _wait_until_full_or_due(self) -> None:
        """Wait for more requests until the batch is full, the oldest one is due, or close()."""
        while self._queue and not self._closing and not self._batch_is_full():
            due_in = self._queue[0].submitted_at + self._max_delay_seconds - time.monotonic()
            if due_in <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), due_in)
            except asyncio.TimeoutError:
                return

    def _batch_is_full(self) -> bool:
        rows = 0
        for request in self._queue:
            if request.future.done():  # cancelled, not yet withdrawn by its task
                continue
            if rows + request.size > self.max_batch_size:
                return True
            rows += request.size
        return rows == self.max_batch_size

    def _take_batch(self) -> list[_Request]:
        batch: list[_Request] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            request = self._queue[0]
            if request.future.done():
                self._queue.popleft()
                continue
            if request.expired(now):
                self._queue.popleft()
                waited = now - request.submitted_at
                request.future.set_exception(
                    DeadlineExceeded(f"the request's deadline passed after {waited:.3f} s queued")
                )
                continue
            if batch and rows + request.size > self.max_batch_size:
                break
            self._queue.popleft()
            batch.append(request)
            rows += request.size
            if rows >= self.max_batch_size:
                break
        return batch

    async def _dispatch(self, batch: list[_Request]) -> None:
        dispatched_at = time.monotonic()
        items = [request.item for request in batch]
        error: BaseException | None = None
        results: Sequence[Any] = ()
        stop = StopSignal()
        loop = asyncio.get_running_loop()
        running = _Running(batch, stop)
        self._running.append(running)
        self._arm_expiry(running)
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, items, stop)
            if len(results) != len(batch):
                error = RuntimeError(
                    f"run_batch returned {len(results)} results for {len(batch)} requests"
                )
        except Exception as exc:
            error = exc
        finally:
            self._running.remove(running)
            if running.expiry is not None:
                running.expiry.cancel()
                running.expiry = None
            self._changed.set()  # an instance is free
        run_seconds = time.monotonic() - dispatched_at

        for index, request in enumerate(batch):
            if request.future.done():  # cancelled while running
                continue
            if error is None:
                request.future.set_result(results[index])
            else:
                request.future.set_exception(error)

        if self._on_batch is not None:
            stats = BatchStats(
                rows=sum(request.size for request in batch),
                requests=len(batch),
                queue_seconds=tuple(dispatched_at - request.submitted_at for request in batch),
                run_seconds=run_seconds,
                failed=error is not None,
                stopped=stop.is_set(),
            )
            try:
                self._on_batch(stats)
            except Exception:
                logger.exception("on_batch callback of %s failed", self._subject())
