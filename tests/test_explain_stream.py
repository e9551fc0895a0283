"""ExplainStream against an in-process server: a Score-CAM request run in steps reports its
masked passes after each step, monotonically, and ends with the response Explain gives; a
cancelled call stops its steps. The steps are made one Loop iteration each (STEP_SECONDS
patched down), and each session run of a step is counted (and slowed, for the cancellation)
through the module's `_session_run`."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

import servers
from gradcam_common.methods import enum_value
from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc as pb_grpc
from gradcam_server import model as served_model
from gradcam_server.server import GradCamServer, ServerOptions

SIZE = servers.TINY_SIZE
IMAGES = 8  # 8 images x 16 channels: up to 128 distinct maps, 4 Loop iterations of 32


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream-repository")
    servers.export_torch(servers.tiny_cnn(), SIZE, root / "tiny" / "model.onnx",
                         dynamic_batch=True)
    servers.write_config(root / "tiny", max_batch_size=IMAGES)
    return root


def request(method: str = "scorecam") -> pb.ExplainRequest:
    x = np.random.default_rng(3).standard_normal((IMAGES, 3, SIZE, SIZE)).astype(np.float32)
    return pb.ExplainRequest(
        model="tiny", method=enum_value(method),
        images=[pb.Image(tensor=pb.Tensor(shape=list(image.shape), data=image.tobytes()))
                for image in x],
    )


class CountedRuns:
    """Wraps `_session_run`: counts the session runs, each delayed by `delay` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.count = 0
        self._run = served_model._session_run
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.count += 1
        time.sleep(self.delay)
        return self._run(*args, **kwargs)


class _Target:
    """What a client scenario gets: the server's address."""

    def __init__(self, target: str) -> None:
        self.target = target


def serve(root: Path, scenario, stub_target: bool = False):
    """Run `scenario(stub)` (blocking, in a thread) against an in-process server; with
    `stub_target`, `scenario` gets an object whose ``target`` is the server's address."""

    async def main():
        server = GradCamServer(ServerOptions(root, port=0, metrics_port=None, threads=1))
        port = await server.start()
        await server.wait_until_loaded()
        try:
            def call():
                if stub_target:
                    return scenario(_Target(f"127.0.0.1:{port}"))
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    return scenario(pb_grpc.GradCamStub(channel))
            return await asyncio.to_thread(call)
        finally:
            await server.stop(grace=1)

    return asyncio.run(main())


def test_progress_is_monotonic_and_ends_with_the_response(root, monkeypatch) -> None:
    monkeypatch.setattr(served_model, "STEP_SECONDS", 1e-9)  # one iteration per step
    runs = CountedRuns()
    monkeypatch.setattr(served_model, "_session_run", runs)

    def scenario(stub):
        updates = list(stub.ExplainStream(request(), timeout=120))
        before = runs.count
        unary = stub.Explain(request(), timeout=120)
        return updates, unary, runs.count - before

    updates, unary, unary_runs = serve(root, scenario)
    kinds = [u.WhichOneof("kind") for u in updates]
    assert kinds[-1] == "response" and set(kinds[:-1]) == {"progress"}
    progress = [u.progress for u in updates[:-1]]
    done = [p.passes_done for p in progress]
    total = {p.passes_total for p in progress}
    assert len(total) == 1 and len(progress) == unary_runs >= 3  # a message per session run
    (total,) = total
    assert done == sorted(set(done)) and done[-1] == total
    assert all(0 < b - a <= 32 for a, b in zip([0, *done], done))  # one iteration a step
    assert [p.elapsed_seconds for p in progress] == sorted(p.elapsed_seconds for p in progress)
    assert progress[-1].remaining_seconds == 0
    streamed = updates[-1].response
    assert len(streamed.explanations) == IMAGES
    for ours, theirs in zip(streamed.explanations, unary.explanations):
        np.testing.assert_array_equal(
            np.frombuffer(ours.heatmaps[0].data, np.float32),
            np.frombuffer(theirs.heatmaps[0].data, np.float32))


def test_other_methods_stream_the_response_alone(root) -> None:
    updates = serve(root, lambda stub: list(stub.ExplainStream(request("gradcam"), timeout=60)))
    assert [u.WhichOneof("kind") for u in updates] == ["response"]
    assert len(updates[0].response.explanations) == IMAGES


def test_a_cancelled_stream_stops_its_steps(root, monkeypatch) -> None:
    monkeypatch.setattr(served_model, "STEP_SECONDS", 1e-9)
    runs = CountedRuns(delay=0.5)  # 4 steps: 2 s
    monkeypatch.setattr(served_model, "_session_run", runs)

    def scenario(stub):
        call = stub.ExplainStream(request(), timeout=120)
        first = next(call)
        call.cancel()
        cancelled_at = runs.count
        time.sleep(2.0)
        return first, cancelled_at, runs.count

    first, cancelled_at, final = serve(root, scenario)
    assert first.WhichOneof("kind") == "progress" and first.progress.passes_done > 0
    assert first.progress.passes_done < first.progress.passes_total
    assert final <= cancelled_at + 1  # the step running when it was cancelled, at most


def test_the_client_tells_progress_and_returns_the_plain_results(root, monkeypatch) -> None:
    from gradcam_client import AsyncGradCamClient, GradCamClient

    monkeypatch.setattr(served_model, "STEP_SECONDS", 1e-9)
    x = np.random.default_rng(4).standard_normal((IMAGES, 3, SIZE, SIZE)).astype(np.float32)

    def scenario(stub):
        seen, seen_async = [], []
        with GradCamClient(stub.target) as client:
            streamed = client.explain(x, model="tiny", method="scorecam", on_progress=seen.append)
            plain = client.explain(x, model="tiny", method="scorecam")

        async def awaited():
            async with AsyncGradCamClient(stub.target) as client:
                return await client.explain(x, model="tiny", method="scorecam",
                                            on_progress=seen_async.append)

        return seen, streamed, plain, seen_async, asyncio.run(awaited())

    seen, streamed, plain, seen_async, streamed_async = serve(root, scenario, stub_target=True)
    for told in (seen, seen_async):
        assert len(told) >= 3 and told[-1].fraction == 1.0
        assert [p.passes_done for p in told] == sorted({p.passes_done for p in told})
    for ours, ours_async, theirs in zip(streamed, streamed_async, plain, strict=True):
        np.testing.assert_array_equal(ours.heatmap, theirs.heatmap)
        np.testing.assert_array_equal(ours_async.heatmap, theirs.heatmap)
