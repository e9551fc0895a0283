"""Several server replicas behind one client: addresses balanced round-robin over the replicas
that pass grpc.health.v1, and a replica that dies mid-load costs no request (the calls it
dropped are retried on the other)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gradcam_client import GradCamClient
from gradcam_client.connection import channel_target
from servers import TINY_SIZE, ServerProcess, export_torch, sample, serving, tiny_cnn

pytestmark = pytest.mark.slow


def test_channel_target_of_one_several_and_named_replicas() -> None:
    assert channel_target("127.0.0.1:8001") == ("127.0.0.1:8001", ())
    target, options = channel_target("127.0.0.1:8001, 127.0.0.2:8002")
    assert target == "ipv4:127.0.0.1:8001,127.0.0.2:8002"
    config = json.loads(dict(options)["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    assert dict(options)["grpc.default_authority"] == "127.0.0.1:8001"
    target, _ = channel_target(["localhost:9001", "grpc://127.0.0.1:9002"])
    assert target.startswith("ipv4:") and "127.0.0.1:9002" in target
    target, options = channel_target("dns:///gradcam.example:8001")
    assert target == "dns:///gradcam.example:8001" and "grpc.service_config" in dict(options)
    for bad in ("nohostport,127.0.0.1:1", "127.0.0.1:1,host:port"):
        with pytest.raises(ValueError, match="host:port"):
            channel_target(bad)
    with pytest.raises(ValueError, match="no server address"):
        channel_target(" , ")
    assert channel_target("[::1]:1,[::1]:2")[0] == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="mix IPv4-only and IPv6-only"):
        channel_target("[::1]:1,127.0.0.1:2")


def _requests(server: ServerProcess) -> float:
    return sample(server.metrics(), "gradcam_requests_total", model="tiny", api="explain",
                  method="gradcam")


def test_calls_spread_over_replicas_and_survive_one_dying(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    export_torch(tiny_cnn(), TINY_SIZE, repository / "tiny" / "model.onnx", dynamic_batch=True)
    x = np.random.default_rng(0).normal(size=(3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    with serving(repository, tmp_path / "a.log") as first, \
            serving(repository, tmp_path / "b.log") as second:
        with GradCamClient([first.address, second.address], retries=8, backoff=0.05) as client:
            expected = client.explain(x, model="tiny").heatmap
            for _ in range(19):
                client.explain(x, model="tiny")
            spread = (_requests(first), _requests(second))
            assert sum(spread) == 20 and min(spread) >= 5, spread  # both serve

            stop, failures, answers = threading.Event(), [], []

            def load() -> None:
                while not stop.is_set():
                    try:
                        answers.append(client.explain(x, model="tiny").heatmap)
                    except Exception as error:  # noqa: BLE001 - every failure is counted
                        failures.append(error)

            with ThreadPoolExecutor(4) as pool:
                for _ in range(4):
                    pool.submit(load)
                while len(answers) < 40:
                    stop.wait(0.01)
                first.kill()  # no drain: calls in flight on it are dropped
                done = len(answers)
                while len(answers) < done + 40:
                    stop.wait(0.01)
                stop.set()
            assert failures == []
            assert all(np.allclose(a, expected, atol=1e-6) for a in answers)
            assert _requests(second) > spread[1] + 40 / 2
