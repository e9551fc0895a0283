"""Smoke tests of the model zoo: calibrated models, exact splits, ONNX exports, tensor lookup."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import zoo

pytestmark = pytest.mark.slow

CASES = list(itertools.product(zoo.ZOO_NAMES, zoo.EXPORTERS))


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_calibrated_model_is_alive_and_splits_exactly(name):
    model = zoo.build_torch_model(name)
    assert zoo.build_torch_model(name) is model
    assert not model.training
    stats = zoo.logit_stats(name)
    assert stats["std"] > 1e-2, stats
    assert stats["std_between_images"] > 1e-3, stats

    x = torch.from_numpy(zoo.sample_batch(2))
    with torch.no_grad():
        logits = model(x)
        for split in (zoo.torch_split, zoo.torch_mid_split):
            features_fn, head_fn = split(name, model)
            features = features_fn(x)
            assert features.ndim == 4, (split.__name__, features.shape)
            assert float(features.std()) > 1e-3, split.__name__
            assert torch.equal(head_fn(features), logits), split.__name__


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_export_matches_torch_and_exposes_features(name, exporter, onnx_zoo):
    path = onnx_zoo(name, exporter)
    assert onnx_zoo(name, exporter) == path  # exported once per run

    errors = zoo.check_onnx(name, path, batch_sizes=(1, 2))
    assert max(errors.values()) <= zoo.LOGITS_RTOL, errors

    model = zoo.build_torch_model(name)
    x = zoo.sample_batch(2)
    for split in (zoo.torch_split, zoo.torch_mid_split):
        with torch.no_grad():
            features = split(name, model)[0](torch.from_numpy(x)).numpy()
        found = zoo.find_matching_tensor(path, x, features)  # raises LookupError if none
        assert found not in ("input", "logits"), (split.__name__, found)


def test_find_matching_tensor_reports_a_missing_tensor(onnx_zoo):
    path = onnx_zoo("squeezenet1_1", "dynamo")
    x = zoo.sample_batch(2)
    with pytest.raises(LookupError, match="no tensor"):
        zoo.find_matching_tensor(path, x, np.ones((2, 1000, 13, 13), np.float32))
