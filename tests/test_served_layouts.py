"""Target layers in every layout, served end to end: a ViT-like transformer whose default layer
is tokens [N, T, C] (a class token before an 8 x 8 patch grid), and an NHWC map [N, h, w, C] in
the same graph, explained through both APIs, the SDK and the command line.

- A folder holding only model.onnx serves with the detected layer, reported with its layout,
  prefix tokens and grid (ModelInfo, the SDK, ``gradcam models``).
- Every method either gives a finite map normalised to [0, 1] or is refused with a reason.
- config.json's ``target_layer``, ``target_layout``, ``prefix_tokens`` and ``grid``, and the
  requests' ``layout``, ``prefix_tokens`` and ``grid`` (KServe: ``target_layout``...) change
  what is explained as they say: the served maps are compared with the augmented graph run
  directly with the same options (the augmenter's views are checked in its own tests).
- Bad values are INVALID_ARGUMENT naming what was wrong, and the server keeps serving; each
  distinct layout builds its own graph, within the variant bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as triton

import servers
from gradcam_client import GradCamClient, InvalidInputError
from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc as pb_grpc
from gradcam_server.augment import augment_model
from gradcam_server.augment.passes import ALL_METHODS
from gradcam_server.explain_api import METHOD_ENUMS
from servers import expect_error, sample

CALL_TIMEOUT_S = 120.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SIZE, PATCH, DIM, CLASSES = 32, 4, 32, 10
GRID = SIZE // PATCH  # 8 x 8 patches after one class token
TOKENS_LAYER = "/blocks/blocks.1/norm1/LayerNormalization_output_0"  # before the last attention
NHWC_LAYER = "/embed_norm/LayerNormalization_output_0"  # the patches, channels last
MAX_VARIANTS = 2
VARIANTS = [  # (layer, layout) requested beside the default, one graph each
    (NHWC_LAYER, "nhwc"),
    ("/blocks/blocks.0/norm1/LayerNormalization_output_0", "tokens"),
    ("/blocks/blocks.0/norm2/LayerNormalization_output_0", "tokens"),
    ("/blocks/blocks.0/Add_output_0", "tokens"),
]
# Methods refused on this model, with a fragment of the reason: none, now that Gather (the head
# reads the class token with it) has a backward rule. A method that starts or stops failing here
# must be moved in or out of this table.
# dff runs its concepts through the classifier head, which must pool an NCHW map
REFUSED: dict[str, str] = {"dff": "dff needs an NCHW target layer"}


class Block(torch.nn.Module):
    """Pre-norm: x + attention(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.fc1 = torch.nn.Linear(dim, 2 * dim)
        self.fc2 = torch.nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(n, t, c))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyViT(torch.nn.Module):
    """[N, 3, 32, 32] -> 10 logits: a Conv patch embedding (4 x 4 patches) normalised channels
    last ([N, 8, 8, 32], an NHWC map), a class token and position embeddings, two pre-norm
    attention blocks, a final norm and a head on the class token. The head's random weights
    are torch's default (not zero), so every class score depends on the image. With
    `linear_patches`, the patches are cut by reshapes and embedded by a Linear: no Conv shows
    the grid, which the input size then tells."""

    def __init__(self, linear_patches: bool = False) -> None:
        super().__init__()
        self.linear_patches = linear_patches
        self.patch = torch.nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.embed_norm = torch.nn.LayerNorm(DIM)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos = torch.nn.Parameter(torch.randn(1, 1 + GRID * GRID, DIM) * 0.02)
        self.blocks = torch.nn.Sequential(Block(DIM, 2), Block(DIM, 2))
        self.norm = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, CLASSES)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 8, 8, DIM]: the patches' embeddings, channels last."""
        if not self.linear_patches:
            return self.patch(x).permute(0, 2, 3, 1)
        n = x.shape[0]
        patches = x.reshape(n, 3, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 3, 5, 1)
        weight = self.patch.weight.permute(2, 3, 1, 0).reshape(-1, DIM)  # the Conv's, as a Linear
        return patches.reshape(n, GRID, GRID, -1) @ weight + self.patch.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.embed(x)).flatten(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


@pytest.fixture(scope="module")
def vit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return servers.export_torch(
        TinyViT(), SIZE, tmp_path_factory.mktemp("vit") / "model.onnx", dynamic_batch=True
    )


@pytest.fixture(scope="module")
def linear_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights with the Linear patch embedding: no Conv shows the grid."""
    torch.manual_seed(0)
    return servers.export_torch(TinyViT(linear_patches=True), SIZE,
                                tmp_path_factory.mktemp("linear") / "model.onnx",
                                dynamic_batch=True)


@pytest.fixture(scope="module")
def repository(vit_path: Path, linear_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``vit``: model.onnx alone; ``vit_nhwc``: the NHWC map by config; ``vit_variants``: a
    copy for counting graphs; ``vit_linear``: the Linear patch embedding with its grid given
    by config; ``vit_linear_bare``: the same model.onnx alone."""
    root = tmp_path_factory.mktemp("layouts")
    for name, path in (("vit", vit_path), ("vit_nhwc", vit_path), ("vit_variants", vit_path),
                       ("vit_linear", linear_path), ("vit_linear_bare", linear_path)):
        (root / name).mkdir()
        (root / name / "model.onnx").symlink_to(path)
    servers.write_config(root / "vit_nhwc", target_layer=NHWC_LAYER, target_layout="nhwc")
    servers.write_config(root / "vit_linear", target_layout="tokens", grid=[GRID, GRID])
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with servers.serving(repository, log, "--max-variants", str(MAX_VARIANTS)) as process:
        yield process


@pytest.fixture(scope="module")
def stub(server) -> pb_grpc.GradCamStub:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GradCamStub(channel)


@pytest.fixture(scope="module")
def kserve(server) -> triton.InferenceServerClient:
    with triton.InferenceServerClient(server.address) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(server) -> GradCamClient:
    with GradCamClient(server.address, timeout=CALL_TIMEOUT_S) as client:
        yield client


def images(count: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


def direct(vit_path: Path, x: np.ndarray, **options) -> np.ndarray:
    """The heatmaps of the augmented graph, run here, for each image's top-1 class."""
    augmented = augment_model(vit_path, **options)
    session = ort.InferenceSession(augmented.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(["heatmap"], {"input": x, "target_class": np.full(len(x), -1)})[0]


def explain(stub, x: np.ndarray, model: str = "vit", **fields) -> pb.ExplainResponse:
    tensors = [pb.Image(tensor=pb.Tensor(shape=list(i.shape), data=i.astype("<f4").tobytes()))
               for i in x]
    return stub.Explain(pb.ExplainRequest(model=model, images=tensors, **fields),
                        timeout=CALL_TIMEOUT_S)


def maps(response: pb.ExplainResponse) -> np.ndarray:
    return np.stack([
        np.frombuffer(e.heatmaps[0].data, "<f4").reshape(e.heatmaps[0].height, -1)
        for e in response.explanations
    ])


def infer(kserve, x: np.ndarray, model: str = "vit", **parameters) -> np.ndarray:
    item = triton.InferInput("input", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    result = kserve.infer(model, [item], outputs=[triton.InferRequestedOutput("heatmap")],
                          parameters=parameters or None, client_timeout=CALL_TIMEOUT_S)
    return result.as_numpy("heatmap")


def model_info(stub, model: str) -> pb.ModelInfo:
    return stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=CALL_TIMEOUT_S)


# -- what a folder with model.onnx alone serves --------------------------------------------------


def test_the_detected_layer_is_reported_as_tokens(stub, sdk) -> None:
    info = model_info(stub, "vit")
    assert info.explain_error == ""
    assert info.layer == TOKENS_LAYER
    assert (info.layout, info.prefix_tokens, info.grid) == ("tokens", 1, f"{GRID}x{GRID}")
    assert list(info.layer_shape) == [-1, DIM, GRID, GRID]  # the [N, C, h, w] view
    described = sdk.model_info("vit")
    assert (described.layer, described.layout) == (TOKENS_LAYER, "tokens")
    assert (described.prefix_tokens, described.grid) == (1, (GRID, GRID))


def test_gradcam_models_prints_each_layer_and_its_layout(server) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gradcam_client", "models", "--server", server.address],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("GRADCAM_SERVER", "GRADCAM_TOKEN")},
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(maxsplit=1) for line in done.stdout.splitlines())
    assert lines["vit"].endswith(f"layer {TOKENS_LAYER} (tokens, prefix 1, grid 8x8)")
    assert lines["vit_nhwc"].endswith(f"layer {NHWC_LAYER} (nhwc)")
    assert lines["vit_linear"].endswith(f"layer {TOKENS_LAYER} (tokens, prefix 1, grid 8x8)")
    assert lines["vit_linear_bare"].endswith(f"layer {TOKENS_LAYER} (tokens, prefix 1, grid 8x8)")


def test_typed_api_explains_the_tokens(stub, vit_path) -> None:
    x = images()
    response = explain(stub, x)
    assert response.layer == TOKENS_LAYER
    assert (response.layout, response.prefix_tokens, response.grid) == ("tokens", 1, "8x8")
    np.testing.assert_allclose(maps(response), direct(vit_path, x), atol=1e-5)


def test_kserve_explains_the_tokens(kserve, vit_path) -> None:
    x = images(seed=1)
    np.testing.assert_allclose(infer(kserve, x), direct(vit_path, x), atol=1e-5)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_gives_a_normalised_map_or_a_reason(stub, method: str) -> None:
    enum = METHOD_ENUMS[method]
    if method in REFUSED:
        expect_error(lambda: explain(stub, images(1), method=enum), INVALID, REFUSED[method])
        return
    heatmap = maps(explain(stub, images(1, seed=2), method=enum))
    assert heatmap.shape == (1, SIZE, SIZE)
    assert np.isfinite(heatmap).all()
    assert heatmap.min() >= 0 and heatmap.max() <= 1 + 1e-6
    if method == "randomcam" and heatmap.max() == 0:
        return  # a random combination of channels may be negative everywhere
    assert heatmap.max() > 0.99 and heatmap.min() < 0.01  # normalised, not constant


# -- overrides by request ------------------------------------------------------------------------


def test_a_request_names_the_nhwc_map_with_its_layout(stub, kserve, sdk, vit_path) -> None:
    x = images(seed=3)
    expected = direct(vit_path, x, layer=NHWC_LAYER, layout="nhwc")
    response = explain(stub, x, layer=NHWC_LAYER, layout="nhwc")
    assert (response.layer, response.layout, response.grid) == (NHWC_LAYER, "nhwc", "")
    assert not response.HasField("prefix_tokens")
    np.testing.assert_allclose(maps(response), expected, atol=1e-5)
    detected = explain(stub, x, layer=NHWC_LAYER)  # the same layout, detected
    assert detected.layout == "nhwc"
    np.testing.assert_allclose(maps(detected), expected, atol=1e-5)
    served = infer(kserve, x, target_layer=NHWC_LAYER, target_layout="nhwc")
    np.testing.assert_allclose(served, expected, atol=1e-5)
    result = sdk.explain(x[0], model="vit", layer=NHWC_LAYER, layout="nhwc")
    assert (result.layer, result.layout, result.prefix_tokens, result.grid) == (
        NHWC_LAYER, "nhwc", None, None
    )
    np.testing.assert_allclose(result.heatmap, expected[0], atol=1e-5)


def test_a_request_spelling_out_the_detected_view_gets_the_default_map(
    stub, kserve, sdk, vit_path
) -> None:
    x = images(seed=4)
    default = direct(vit_path, x)
    response = explain(stub, x, layout="tokens", prefix_tokens=1, grid="8x8")
    assert (response.layout, response.prefix_tokens, response.grid) == ("tokens", 1, "8x8")
    np.testing.assert_allclose(maps(response), default, atol=1e-5)
    same = infer(kserve, x, target_layout="tokens", prefix_tokens=1, grid="8x8")
    np.testing.assert_allclose(same, default, atol=1e-5)
    result = sdk.explain(x[0], model="vit", grid=(8, 8), prefix_tokens=1, layout="tokens")
    assert (result.layout, result.prefix_tokens, result.grid) == ("tokens", 1, (8, 8))
    np.testing.assert_allclose(result.heatmap, default[0], atol=1e-5)


LONG = "x" * 2000


@pytest.mark.parametrize(
    ("fields", "parameters", "fragments"),
    [
        ({"layout": "nhwc"}, {"target_layout": "nhwc"},
         ("has rank 3; the nhwc layout needs rank 4", TOKENS_LAYER)),
        ({"layer": NHWC_LAYER, "layout": "tokens"},
         {"target_layer": NHWC_LAYER, "target_layout": "tokens"},
         ("has rank 4; the tokens layout needs rank 3",)),
        ({"layer": NHWC_LAYER, "prefix_tokens": 1},
         {"target_layer": NHWC_LAYER, "prefix_tokens": 1},
         ("prefix_tokens and grid apply to the tokens layout, not nhwc",)),
        ({"layout": "sideways"}, {"target_layout": "sideways"},
         ("unknown layout 'sideways'; expected one of nchw, nhwc, tokens",)),
        ({"prefix_tokens": -1}, {"prefix_tokens": -1}, ("prefix_tokens must be 0..64; got -1",)),
        ({"prefix_tokens": 2}, {"prefix_tokens": 2},
         ("(T = 65) do not fit a 8x8 patch grid after 2 prefix tokens",)),
        ({"grid": "8by8"}, {"grid": "8by8"}, ("grid must be rows x columns", "'8by8'")),
        ({"grid": "0x8"}, {"grid": "0x8"}, ("grid must be rows x columns", "'0x8'")),
        ({"grid": "7x7"}, {"grid": "7x7"}, ("grid 7x7 contradicts the patch embedding",)),
        ({"grid": "4x16"}, {"grid": "4x16"},
         ("grid 4x16 contradicts the patch embedding", "whose grid is 8x8")),
        ({"layer": NHWC_LAYER, "layout": "nchw"}, {"target_layer": NHWC_LAYER,
                                                    "target_layout": "nchw"},
         ("layout nchw contradicts the graph", "as nhwc")),
        ({"layout": LONG}, {"target_layout": LONG}, ("2000 characters long; at most 1024",)),
        ({"grid": LONG}, {"grid": LONG}, ("2000 characters long; at most 1024",)),
    ],
    ids=["nhwc-on-tokens", "tokens-on-nhwc", "prefix-on-nhwc", "unknown", "negative-prefix",
         "prefix-misfit", "malformed-grid", "empty-grid", "grid-misfit", "grid-refuted",
         "layout-refuted", "long-layout",
         "long-grid"],
)
def test_bad_layouts_are_invalid_and_the_server_keeps_serving(
    stub, kserve, fields: dict, parameters: dict, fragments: tuple[str, ...]
) -> None:
    x = images(1, seed=5)
    for message in (expect_error(lambda: explain(stub, x, **fields), INVALID, *fragments),
                    expect_error(lambda: infer(kserve, x, **parameters), INVALID, *fragments)):
        assert LONG not in message and len(message) <= 1024
    assert maps(explain(stub, x)).shape == (1, SIZE, SIZE)  # still serving
    assert infer(kserve, x).shape == (1, SIZE, SIZE)


def test_the_sdk_refuses_a_grid_it_cannot_send(sdk) -> None:
    with pytest.raises(InvalidInputError, match="grid must be"):
        sdk.explain(images(1)[0], model="vit", grid=(8, 8, 1))
    with pytest.raises(InvalidInputError, match="grid must be"):
        sdk.explain(images(1)[0], model="vit", grid="8by8")  # the server's words


def test_each_layout_builds_its_own_graph_within_the_bound(server, stub) -> None:
    x = images(1, seed=6)

    def held() -> float:
        return sample(server.metrics(), "gradcam_explain_graphs", model="vit_variants")

    assert held() == 1  # the default graph
    explain(stub, x, model="vit_variants", layout="tokens", prefix_tokens=1, grid="8x8")
    explain(stub, x, model="vit_variants", layer=TOKENS_LAYER)
    assert held() == 1  # the default layer as detected: the default graph
    seen = {}
    for layer, layout in VARIANTS:
        seen[layer] = maps(explain(stub, x, model="vit_variants", layer=layer, layout=layout))
        assert held() == min(2 + len(seen) - 1, 1 + MAX_VARIANTS)
    assert len({m.tobytes() for m in seen.values()}) == len(seen)  # one graph each
    first, layout = VARIANTS[0]
    again = maps(explain(stub, x, model="vit_variants", layer=first, layout=layout))  # evicted
    np.testing.assert_array_equal(again, seen[first])
    assert held() == 1 + MAX_VARIANTS


# -- overrides by config.json --------------------------------------------------------------------


def test_config_names_the_nhwc_map_with_its_layout(stub, kserve, vit_path) -> None:
    info = model_info(stub, "vit_nhwc")
    assert (info.layer, info.layout, info.grid) == (NHWC_LAYER, "nhwc", "")
    assert not info.HasField("prefix_tokens")
    assert list(info.layer_shape) == [-1, DIM, GRID, GRID]
    x = images(seed=7)
    expected = direct(vit_path, x, layer=NHWC_LAYER, layout="nhwc")
    np.testing.assert_allclose(maps(explain(stub, x, model="vit_nhwc")), expected, atol=1e-5)
    np.testing.assert_allclose(infer(kserve, x, model="vit_nhwc"), expected, atol=1e-5)


def test_the_config_layout_applies_to_a_requested_layer_unless_overridden(
    stub, vit_path
) -> None:
    x = images(1, seed=8)
    expect_error(lambda: explain(stub, x, model="vit_nhwc", layer=TOKENS_LAYER), INVALID,
                 "the nhwc layout needs rank 4")
    response = explain(stub, x, model="vit_nhwc", layer=TOKENS_LAYER, layout="tokens")
    assert (response.layout, response.prefix_tokens, response.grid) == ("tokens", 1, "8x8")
    np.testing.assert_allclose(maps(response), direct(vit_path, x), atol=1e-5)


def test_a_linear_patch_embedding_is_explained_as_the_conv_one(
    stub, kserve, vit_path, linear_path
) -> None:
    """The Linear patch embedding shows no Conv grid: alone, the model's grid is the one that
    tiles its 32 x 32 input; config.json can also give it. Either way it is explained as the
    Conv model is (same weights)."""
    bare = model_info(stub, "vit_linear_bare")
    assert (bare.layer, bare.layout, bare.prefix_tokens, bare.grid) == (
        TOKENS_LAYER, "tokens", 1, "8x8"
    )
    info = model_info(stub, "vit_linear")
    assert (info.layer, info.layout, info.prefix_tokens, info.grid) == (
        TOKENS_LAYER, "tokens", 1, "8x8"
    )
    assert list(info.layer_shape) == [-1, DIM, GRID, GRID]
    x = images(seed=9)
    expected = direct(linear_path, x, grid=(GRID, GRID))
    np.testing.assert_allclose(expected, direct(vit_path, x), atol=1e-4)
    np.testing.assert_allclose(infer(kserve, x, model="vit_linear"), expected, atol=1e-5)
    response = explain(stub, x, model="vit_linear", grid="8x8", prefix_tokens=1)
    assert (response.layout, response.prefix_tokens, response.grid) == ("tokens", 1, "8x8")
    np.testing.assert_allclose(maps(response), expected, atol=1e-5)
    np.testing.assert_allclose(maps(explain(stub, x, model="vit_linear_bare")), expected,
                               atol=1e-5)
