"""The engine: admission, batchers and sessions. It runs checked `Feeds` through a model's
plain graph or one of its augmented graphs and returns the outputs; it knows neither gRPC nor
how a request was written.

What one client can make it hold is bounded (`ServiceLimits`): requests admitted per model
(`admit`, checked before anything is decoded) and batchers (one per model, graph and input
shape; an LRU keeps `max_batchers`, and all share one pool of `runtime_threads`; a batcher runs
up to its model's ``instances`` batches at once, each session on its share of the cores). A graph
variant not built yet is augmented by one builder thread, so requests waiting for it never
hold the threads that run other requests. The runtime threads run at the sessions' lower CPU
priority (`RuntimeOptions.nice`), below the event loop's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .batching import BatchStats, DynamicBatcher, StopSignal
from .errors import QueueFull
from .model import Graph, Progress, ServedModel
from .postprocess import MAX_RESPONSE_BYTES
from .preprocess import DEFAULT_MAX_PIXELS
from .runtime import lower_priority
from .validate import Feeds


@dataclass(frozen=True)
class ServiceLimits:
    """What one request, and all of them together, may make the server hold."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # per decoded image, per mask, per requested heatmap
    max_response_bytes: int = MAX_RESPONSE_BYTES
    max_batchers: int = 64  # (model, graph variant, input shape) batchers kept, LRU
    runtime_threads: int = 2  # batches that run at once, over all batchers (and instances)


@dataclass(frozen=True)
class RunResult:
    outputs: dict[str, np.ndarray]
    queue_seconds: float
    run_seconds: float


@dataclass
class _Queued:
    feeds: Feeds
    progress: Progress | None = None
    submitted: float = field(default_factory=time.perf_counter)


class Engine:
    def __init__(self, limits: ServiceLimits = ServiceLimits(), on_batch=None,
                 nice: int = 0) -> None:
        self.limits = limits
        self._on_batch = on_batch  # (model name, graph name, BatchStats) -> None
        self._batchers: OrderedDict[tuple, DynamicBatcher] = OrderedDict()
        self._retired: set[asyncio.Task] = set()  # evicted batchers finishing their queue
        self._runtime = concurrent.futures.ThreadPoolExecutor(
            limits.runtime_threads, thread_name_prefix="runtime",
            initializer=lower_priority, initargs=(nice,),
        )
        self._builder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="augment")
        self._admitted: dict[str, int] = {}

    @property
    def batchers(self) -> int:
        """Batchers held now (bounded by `ServiceLimits.max_batchers`)."""
        return len(self._batchers)

    def in_progress(self) -> list[tuple[str, int]]:
        """(model name, requests admitted and not yet answered), for the metrics."""
        return list(self._admitted.items())

    @contextlib.contextmanager
    def admit(self, model: ServedModel) -> Iterator[None]:
        """Hold one of the model's request places while the block runs; QueueFull at once,
        before anything is decoded, when all are taken. A model has room for its queue
        (``max_queue_size``) and its batches running (``instances`` x ``max_batch_size``)."""
        limit = model.config.max_queue_size + self._instances(model) * model.max_batch_size
        held = self._admitted.get(model.name, 0)
        if held >= limit:
            raise QueueFull(
                f"model {model.name!r} queue is full ({held} requests in progress); retry later"
            )
        self._admitted[model.name] = held + 1
        try:
            yield
        finally:
            self._admitted[model.name] -= 1

    def _instances(self, model: ServedModel) -> int:
        """Batches of `model` that run at once: its ``instances``, within the runtime threads."""
        return min(model.config.instances, self.limits.runtime_threads)

    async def run(
        self, model: ServedModel, graph: Graph | None, feeds: Feeds,
        deadline: float | None = None, progress: Progress | None = None,
    ) -> RunResult:
        """Run checked `feeds` through the model's batcher: the plain graph (`graph` None) or
        the augmented `graph`, built on first use (InvalidInput where it cannot be built as
        asked). `progress(done, total)` is called, from a runtime thread, between the steps
        of a graph run in steps (Score-CAM's masked passes of the whole batch)."""
        if graph is not None and not model.is_built(graph):
            await asyncio.get_running_loop().run_in_executor(
                self._builder, model.explainer, graph
            )
        return await self._batcher(model, graph, feeds.x.shape[1:]).submit(
            _Queued(feeds, progress), size=feeds.rows, deadline=deadline
        )

    def _batcher(
        self, model: ServedModel, graph: Graph | None, shape: tuple[int, ...]
    ) -> DynamicBatcher:
        """The batcher of (model, graph, input shape); the least recently used one is retired
        (it finishes what it has queued) once `max_batchers` are held."""
        key = (model.name, graph, shape)
        batcher = self._batchers.get(key)
        if batcher is not None:
            self._batchers.move_to_end(key)
            return batcher
        batcher = self._batchers[key] = self._make_batcher(model, graph)
        while len(self._batchers) > self.limits.max_batchers:
            _, retired = self._batchers.popitem(last=False)
            task = asyncio.get_running_loop().create_task(retired.close())
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        return batcher

    def _make_batcher(self, model: ServedModel, graph: Graph | None) -> DynamicBatcher:
        name = "forward" if graph is None else graph.metrics_name

        def run_batch(queued: list[_Queued], stop: StopSignal) -> list[RunResult]:
            start = time.perf_counter()
            told = [q.progress for q in queued if q.progress is not None]

            def progress(done: int, total: int) -> None:
                for tell in told:
                    tell(done, total)

            outputs = _run(model, graph, _concatenated([q.feeds for q in queued]), stop,
                           progress if told else None)
            run_seconds = time.perf_counter() - start
            results, row = [], 0
            for item in queued:
                rows = slice(row, row + item.feeds.rows)
                row += item.feeds.rows
                results.append(RunResult(
                    {key: value[rows] for key, value in outputs.items()},
                    queue_seconds=start - item.submitted, run_seconds=run_seconds,
                ))
            return results

        def on_batch(stats: BatchStats) -> None:
            if self._on_batch is not None:
                self._on_batch(model.name, name, stats)

        return DynamicBatcher(
            run_batch,
            max_batch_size=model.max_batch_size,
            max_queue_delay_microseconds=model.config.max_queue_delay_microseconds,
            max_queue_size=model.config.max_queue_size,
            executor=self._runtime,
            name=model.name,
            on_batch=on_batch,
            instances=self._instances(model),
        )

    async def close(self) -> None:
        """Stop taking work and finish what is queued or running."""
        await asyncio.gather(*(b.close() for b in self._batchers.values()), *self._retired)
        self._runtime.shutdown(wait=False)
        self._builder.shutdown(wait=False, cancel_futures=True)


def _concatenated(parts: list[Feeds]) -> Feeds:
    """The feeds of several requests as one batch, in order."""
    if len(parts) == 1:
        return parts[0]

    def joined(values: list) -> np.ndarray | None:
        return None if values[0] is None else np.concatenate(values)

    first = parts[0]
    return Feeds(
        np.concatenate([p.x for p in parts]),
        joined([p.target_class for p in parts]),
        joined([p.reference for p in parts]),
        joined([p.mask for p in parts]),
        {name: np.concatenate([p.others[name] for p in parts]) for name in first.others},
        None if first.detection is None else tuple(
            np.concatenate([p.detection[i] for p in parts]) for i in (0, 1)
        ),
    )


def _run(model: ServedModel, graph: Graph | None, feeds: Feeds, stop: StopSignal,
         progress: Progress | None) -> dict:
    if graph is None:
        return model.forward(feeds.x, feeds.others, stop=stop)
    return model.explain(feeds.x, feeds.target_class, graph, feeds.reference, feeds.mask,
                         feeds.others, stop=stop, detection=feeds.detection, progress=progress)
