"""The service core in process, without gRPC: the bounds it keeps on batchers and admissions."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import servers
from gradcam_server.errors import QueueFull
from gradcam_server.model import Explaining
from gradcam_server.repository import ModelRepository
from gradcam_server.runtime import RuntimeOptions
from gradcam_server.service import GradCamService, ServiceLimits


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    root = tmp_path_factory.mktemp("service-repository")
    servers.export_torch(servers.tiny_cnn(), servers.TINY_SIZE, root / "tiny" / "model.onnx",
                         dynamic_batch=True)
    servers.write_config(root / "tiny", max_batch_size=2, max_queue_size=3)
    repository = ModelRepository(root, RuntimeOptions("cpu", 1))
    repository.load_all()
    return repository


def test_batchers_are_kept_in_a_bounded_lru(repository: ModelRepository) -> None:
    model = repository.get("tiny")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)

    async def scenario() -> list[np.ndarray]:
        service = GradCamService(repository, ServiceLimits(max_batchers=2))
        heatmaps = []
        for method in ("gradcam", "gradcam++", "xgradcam", "layercam", "gradcam"):
            result = await service.run(model, x, explain=Explaining(method))
            heatmaps.append(result.outputs["heatmap"])
            assert service.batchers <= 2
        await service.close()
        return heatmaps

    heatmaps = asyncio.run(scenario())
    np.testing.assert_array_equal(heatmaps[0], heatmaps[-1])  # rebuilt, same answer
    assert all(h.shape == (1, 32, 32) for h in heatmaps)


def test_admission_refuses_past_the_queue_and_one_batch(repository: ModelRepository) -> None:
    model = repository.get("tiny")
    service = GradCamService(repository)
    with service.admit(model), service.admit(model), service.admit(model):
        with service.admit(model), service.admit(model):  # 3 queued + a batch of 2
            with pytest.raises(QueueFull, match="queue is full"):
                with service.admit(model):
                    pass
    with service.admit(model):  # every place given back
        pass
