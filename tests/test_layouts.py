"""Target layers in every layout, on small transformer and CNN models exported from torch.

Each model is a few layers written here so every architectural case is explicit: pre-norm and
post-norm attention blocks, class and distillation tokens, a channels-last stage, a ConvNeXt
head (LayerNorm on the pooled map), a hybrid whose last attention is followed by convolutions.
The default layer and its view are checked against the recipe (which torch module), and the
heatmap against pytorch-grad-cam at that module with the matching reshape_transform. Refusals
(ambiguous layout, 1 x 1 grid, dim 0 not the batch) must name the problem and the candidates.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from gradcam_server.augment import AugmentError, augment_model, explained_target
from gradcam_server.augment.cli import main as augment_command

SIZE = 32
PATCH = 8
GRID = SIZE // PATCH
WIDTH = 16
CLASSES = 5


class Attention(nn.Module):
    def __init__(self, width: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    def __init__(self, width: int, post_norm: bool = False) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Conv patch embedding, `prefix` learned tokens first, blocks, a head on the tokens."""

    def __init__(self, prefix: int = 1, post_norm: bool = False, pool: str = "token") -> None:
        super().__init__()
        self.pool = pool
        self.embed = nn.Conv2d(3, WIDTH, PATCH, PATCH)
        self.prefix = nn.Parameter(torch.randn(1, prefix, WIDTH) * 0.5)
        self.position = nn.Parameter(torch.randn(1, prefix + GRID * GRID, WIDTH) * 0.1)
        self.blocks = nn.Sequential(Block(WIDTH, post_norm), Block(WIDTH, post_norm))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.prefix.expand(x.shape[0], -1, -1), tokens], 1) + self.position
        tokens = self.norm(self.blocks(tokens))
        if self.pool == "mean":
            return self.head(tokens[:, self.prefix.shape[1]:].mean(1))
        return sum(self.head(tokens[:, i]) for i in range(self.prefix.shape[1]))


class ClassAttention(nn.Module):
    """CaiT's class attention: the class token queries itself and the patches."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.q, self.kv = nn.Linear(width, width), nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        u = self.norm1(torch.cat([cls, patches], 1))
        k, v = self.kv(u).chunk(2, -1)
        attention = (self.q(u[:, :1]) @ k.transpose(-2, -1) * WIDTH ** -0.5).softmax(-1)
        return cls + self.proj(attention @ v)


class TinyCaiT(nn.Module):
    """Self-attention over the patches, then the class token joins in class attention: the
    recipe's layer is the last class-attention norm (its input is a concatenation, not the
    residual stream, yet it sits in front of the attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, WIDTH, PATCH, PATCH)
        self.block = Block(WIDTH)
        self.cls = nn.Parameter(torch.randn(1, 1, WIDTH) * 0.5)
        self.class_attention = ClassAttention(WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.block(self.embed(x).flatten(2).transpose(1, 2))
        cls = self.class_attention(self.cls.expand(x.shape[0], -1, -1), patches)
        return self.head(self.norm(torch.cat([cls, patches], 1))[:, 0])


class LinearEmbeddingViT(TinyViT):
    """Patches cut with reshapes and embedded by a Linear (no Conv shows the grid)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * PATCH * PATCH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        patches = x.reshape(n, 3, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 1, 3, 5)
        tokens = self.linear(patches.reshape(n, GRID * GRID, 3 * PATCH * PATCH))
        tokens = torch.cat([self.prefix.expand(n, -1, -1), tokens], 1) + self.position
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens[:, 0])


class MergedTokensViT(nn.Module):
    """LeViT's kind of token merging: patch tokens on a 4 x 4 grid, a block, then every other
    row and column of the grid kept (2 x 2 tokens), another block, a head on their mean."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, WIDTH, PATCH, PATCH)
        self.block = Block(WIDTH)
        self.merged = Block(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.block(self.embed(x).flatten(2).transpose(1, 2))
        n, _, c = tokens.shape
        tokens = tokens.reshape(n, GRID, GRID, c)[:, ::2, ::2].reshape(n, -1, c)
        return self.head(self.merged(tokens).mean(1))


class ChannelsLast(nn.Module):
    """A conv stem, then a stage in [N, h, w, C] (LayerNorm and MLP on the last axis), mean
    pooled over (h, w) as Swin's head does."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, WIDTH, 4, 4), nn.ReLU())
        self.norm = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU())
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        x = self.norm(x + self.mlp(x))
        return self.head(x.mean((1, 2)))


class ConvNeXtHead(nn.Module):
    """Conv features, global pooling, then LayerNorm on the pooled map in channels-last and
    back, flatten, linear (timm's ConvNeXt head)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(8, WIDTH, 3, 2, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.features(x))
        normed = self.norm(pooled.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(normed.flatten(1))


class Hybrid(nn.Module):
    """Attention over a conv stage's tokens, then convolutions again (MobileViT-like): the head
    is a CNN's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, WIDTH, 4, 4)
        self.block = Block(WIDTH)
        self.fuse = nn.Sequential(nn.Conv2d(WIDTH, WIDTH, 3, 1, 1), nn.ReLU())
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)
        n, c, h, w = f.shape
        tokens = self.block(f.flatten(2).transpose(1, 2))
        f = self.fuse(tokens.transpose(1, 2).reshape(n, c, h, w))
        return self.head(f.mean((2, 3)))


def build(cls, **kwargs) -> nn.Module:
    torch.manual_seed(sum(map(ord, cls.__name__)) + len(kwargs))
    return cls(**kwargs).eval()


def export(model: nn.Module, dynamo: bool = False) -> bytes:
    example = torch.randn(2, 3, SIZE, SIZE)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=["input"],
                                        output_names=["logits"])
            return program.model_proto.SerializeToString()
        torch.onnx.export(model, example, buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return buffer.getvalue()


def parsed(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    """A model from ONNX text, with its initializers."""
    model = onnx.parser.parse_model(text)
    for name, value in initializers.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    return model


def images(n: int = 2) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def tokens_to_map(prefix: int):
    def transform(t: torch.Tensor) -> torch.Tensor:
        return t[:, prefix:].reshape(t.shape[0], GRID, GRID, t.shape[2]).permute(0, 3, 1, 2)
    return transform


def run(augmented: onnx.ModelProto, x: np.ndarray, classes: np.ndarray) -> dict:
    session = ort.InferenceSession(augmented.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    values = session.run(None, {"input": x, "target_class": classes.astype(np.int64)})
    return dict(zip([o.name for o in session.get_outputs()], values))


def reference(model, module, x, classes, transform=None) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam's heatmaps at `module`, and torch's d logit / d (viewed) module output."""
    cam = GradCAM(model=model, target_layers=[module], reshape_transform=transform)
    maps = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(int(c)) for c in classes])
    gradients = cam.activations_and_grads.gradients[0].numpy()
    return maps, gradients


def assert_matches(model, module, exported, x, transform=None, expected=None, **options):
    augmented = augment_model(exported, **options)
    target = explained_target(augmented)
    if expected is not None:
        assert {k: target[k] for k in expected} == expected, target
    with torch.no_grad():
        classes = model(torch.from_numpy(x)).argmax(1).numpy()
    out = run(augmented, x, classes)
    maps, gradients = reference(model, module, x, classes, transform)
    for ours, theirs in zip(out["heatmap"], maps):
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999
    error = np.linalg.norm(out["gradients"] - gradients) / np.linalg.norm(gradients)
    assert error < 1e-4, error
    return target


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("prefix", [1, 2])
def test_vit_default_layer_is_the_norm_before_the_last_attention(prefix, dynamo):
    model = build(TinyViT, prefix=prefix)
    target = assert_matches(
        model, model.blocks[-1].norm1, export(model, dynamo), images(),
        tokens_to_map(prefix),
        expected={"layout": "tokens", "prefix_tokens": str(prefix), "grid": f"{GRID}x{GRID}"},
    )
    assert "norm1" in target["layer"] or "layer_norm" in target["layer"]


def test_class_attention_takes_its_norm():
    model = build(TinyCaiT)
    target = assert_matches(model, model.class_attention.norm1, export(model), images(),
                            tokens_to_map(1), expected={"layout": "tokens", "grid": "4x4"})
    assert target["layer"].startswith("/class_attention/norm1/")


def test_post_norm_blocks_take_the_final_norm():
    """A post-norm block's norm1 follows attention, so the recipe's target is the final norm;
    mean pooling over the patches lets every token reach the score."""
    model = build(TinyViT, post_norm=True, pool="mean")
    target = assert_matches(model, model.norm, export(model), images(), tokens_to_map(1),
                            expected={"layout": "tokens", "prefix_tokens": "1"})
    assert target["layer"].startswith("/norm/")


def test_channels_last_stage_is_seen_as_nchw():
    model = build(ChannelsLast)
    assert_matches(model, model.norm, export(model), images(),
                   lambda t: t.permute(0, 3, 1, 2), expected={"layout": "nhwc"})


def test_convnext_head_steps_over_the_pooled_layer_norm():
    """The LayerNorm on the pooled [N, C, 1, 1] map is not the target: the map before the
    pooling is (a 1 x 1 target would give constant heatmaps)."""
    model = build(ConvNeXtHead)
    assert_matches(model, model.features, export(model), images(), expected={"layout": "nchw"})


def test_exporter_ops_between_pooling_and_head_are_stepped_over():
    """dynamo writes timm's ConvNeXt head with an as_strided (a Reshape to one axis and a
    Gather back to [N, C, 1, 1]) between the pooling and the LayerNorm: the target is still
    the map before the pooling."""
    model = build(ConvNeXtHead)
    exported = onnx.load_from_string(export(model))
    graph = exported.graph
    pool = next(n for n in graph.node if n.op_type == "GlobalAveragePool")
    index = list(graph.node).index(pool) + 1
    graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "flat_shape"),
        onnx.numpy_helper.from_array(np.arange(2 * WIDTH).reshape(2, WIDTH, 1, 1), "strided"),
    ])
    graph.node.insert(index, onnx.helper.make_node("Reshape", [pool.output[0], "flat_shape"],
                                                   ["flat_pooled"]))
    graph.node.insert(index + 1, onnx.helper.make_node("Gather", ["flat_pooled", "strided"],
                                                       ["as_strided"]))
    for node in graph.node[index + 2:]:
        node.input[:] = ["as_strided" if t == pool.output[0] else t for t in node.input]
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    assert_matches(model, model.features, exported, images(2), expected={"layout": "nchw"})


def test_hybrid_with_convolutions_after_attention_uses_the_cnn_recipe():
    model = build(Hybrid)
    assert_matches(model, model.fuse, export(model), images(), expected={"layout": "nchw"})


def test_explicit_layout_prefix_and_grid_override_detection():
    """Naming the first block's norm2 with explicit tokens, prefix and grid gives
    pytorch-grad-cam's map at that module."""
    model = build(TinyViT)
    exported = export(model)
    graph = onnx.load_from_string(exported).graph
    norm2 = next(n.output[0] for n in graph.node if "blocks.0/norm2" in n.name)
    assert_matches(model, model.blocks[0].norm2, exported, images(), tokens_to_map(1),
                   layer=norm2, layout="tokens", prefix_tokens=1, grid=(GRID, GRID),
                   expected={"layer": norm2, "prefix_tokens": "1", "grid": f"{GRID}x{GRID}"})


def test_cli_reports_the_layer_and_layout(tmp_path, capsys):
    path = tmp_path / "vit.onnx"
    path.write_bytes(export(build(TinyViT, prefix=2)))
    assert augment_command([str(path), "-o", str(tmp_path / "out.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "layout tokens" in printed and "prefix_tokens 2" in printed and "grid 4x4" in printed
    assert augment_command([str(path), "-o", str(tmp_path / "o.onnx"), "--grid", "3x5",
                            "--prefix-tokens", "2", "--layout", "tokens"]) == 1
    assert "grid 3x5 contradicts the patch embedding" in capsys.readouterr().err


def test_wrong_grid_or_prefix_is_refused_with_candidates():
    exported = export(build(TinyViT))
    with pytest.raises(AugmentError, match=r"T = 17\) do not fit a 4x4 patch grid after 3 "
                                           r"prefix tokens.*Candidate layers"):
        augment_model(exported, prefix_tokens=3)
    with pytest.raises(AugmentError, match="unknown layout 'nwhc'"):
        augment_model(exported, layout="nwhc")
    with pytest.raises(AugmentError, match="prefix_tokens and grid apply to the tokens layout"):
        augment_model(exported, layout="nhwc", grid=(2, 2))
    with pytest.raises(AugmentError, match="could not detect a transformer's target layer"):
        augment_model(export(build(ConvNeXtHead)), grid=(2, 2))


def test_overrides_that_the_graph_refutes_are_refused():
    """A layout against unanimous evidence, or a grid of the patch embedding's cell count but
    another shape, would give a wrong map: refused."""
    with pytest.raises(AugmentError, match="layout nchw contradicts the graph.*as nhwc"):
        augment_model(export(build(ChannelsLast)), layout="nchw")
    with pytest.raises(AugmentError, match="grid 2x8 contradicts the patch embedding .* 4x4"):
        augment_model(export(build(TinyViT)), grid=(2, 8))


def test_a_linear_patch_embedding_takes_the_grid_that_tiles_the_input():
    """Patches cut by reshapes and embedded by a Linear show no Conv grid: the grid is the one
    whose T - prefix patches tile the static 32 x 32 input (4 x 4 after 1 token)."""
    model = build(LinearEmbeddingViT)
    assert_matches(model, model.blocks[-1].norm1, export(model), images(), tokens_to_map(1),
                   expected={"layout": "tokens", "prefix_tokens": "1", "grid": "4x4"})


def test_grid_override_rescues_a_grid_the_graph_cannot_tell():
    """With a dynamic input size nothing in the graph tells the grid: refused, naming the
    grid; with the grid given, the recipe's layer is explained."""
    model = build(LinearEmbeddingViT)
    exported = onnx.load_from_string(export(model))
    for dim in exported.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"
    with pytest.raises(AugmentError, match="cannot tell the patch grid.*give the grid"):
        augment_model(exported, layout="tokens")
    assert_matches(model, model.blocks[-1].norm1, exported, images(), tokens_to_map(1),
                   grid=(GRID, GRID), expected={"layout": "tokens", "prefix_tokens": "1"})


def test_tokens_merged_after_the_patch_embedding_are_refused_with_the_grid_that_fits():
    """With a dynamic batch the merged tokens' count is symbolic in the exported graph, so
    the patch embedding's 4 x 4 grid was taken and the run failed in a Reshape. Counted by
    shape inference at batch one (T = 4), the grid is refused naming the 2 x 2 that tiles the
    input, the candidates carry that grid, and with it the map matches pytorch-grad-cam."""
    model = build(MergedTokensViT)
    exported = onnx.load_from_string(export(model))
    layer = next(n.output[0] for n in exported.graph.node
                 if n.op_type == "LayerNormalization" and n.name.startswith("/merged/norm1"))
    inferred = onnx.shape_inference.infer_shapes(exported).graph.value_info
    tokens = next(v.type.tensor_type.shape.dim[1] for v in inferred if v.name == layer)
    assert not tokens.HasField("dim_value")  # T is symbolic
    fits = r"T = 4\) do not fit a 4x4 patch grid .*tile the input as 2x2 after 0 prefix tokens"
    with pytest.raises(AugmentError, match=fits + r".*Candidate layers \(last first\): "
                                                  r"/merged/Add_1_output_0 \[.*\] tokens "
                                                  r"\(prefix 0, grid 2x2\)"):
        augment_model(exported)
    with pytest.raises(AugmentError, match=fits):
        augment_model(exported, layer=layer, layout="tokens")

    def to_map(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], 2, 2, t.shape[2]).permute(0, 3, 1, 2)

    assert_matches(model, model.merged.norm1, exported, images(), to_map, layer=layer,
                   grid=(2, 2), expected={"layout": "tokens", "grid": "2x2"})


def test_an_input_size_two_grids_tile_is_refused():
    """10 tokens on a 32 x 64 input: 2 x 4 patches after 2 tokens, or 1 x 2 after 8. Refused,
    naming both; with the prefix given, the grid follows."""
    graph_text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 32, 64] input) => (float[N, 5] logits) {
        flat = Reshape(input, shape)
        patches = MatMul(flat, embed)
        tokens = Pad(patches, pads)
        normed = LayerNormalization <axis = -1> (tokens, scale)
        first = Gather <axis = 1> (normed, zero)
        logits = MatMul(first, head)
    }"""
    rng = np.random.default_rng(0)
    model = parsed(graph_text,
                   shape=np.array([0, 8, 768], np.int64),
                   embed=rng.standard_normal((768, 8)).astype(np.float32),
                   pads=np.array([0, 2, 0, 0, 0, 0], np.int64),
                   scale=np.ones(8, np.float32),
                   zero=np.array(0, np.int64),
                   head=rng.standard_normal((8, 5)).astype(np.float32))
    with pytest.raises(AugmentError, match=r"input size does not decide it; it fits 2x4 after "
                                           r"2, 1x2 after 8"):
        augment_model(model, layer="normed")
    target = explained_target(augment_model(model, layer="normed", prefix_tokens=2))
    assert (target["prefix_tokens"], target["grid"]) == ("2", "2x4")


def test_a_pooled_map_is_refused_as_one_by_one():
    model = build(ConvNeXtHead)
    graph = onnx.load_from_string(export(model)).graph
    pooled = next(n.output[0] for n in graph.node if n.op_type == "GlobalAveragePool")
    with pytest.raises(AugmentError, match=r"1 x 1 spatial grid.*constant.*Candidate layers "
                                           r"\(last first\): \S+ \[N, 16, 8, 8\] nchw"):
        augment_model(export(model), layer=pooled)


def test_a_tensor_without_layout_evidence_is_refused_as_ambiguous():
    """A rank-4 tensor whose neighbours are element-wise ops and reshapes shows no channel
    axis: refused, never guessed."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] input) => (float[N, 5] logits) {
        flat = Reshape(input, shape)
        mixed = MatMul(flat, w)
        grid = Reshape(mixed, back)
        t = Tanh(grid)
        f = Flatten(t)
        logits = MatMul(f, head)
    }"""
    rng = np.random.default_rng(0)
    model = parsed(text,
                   shape=np.array([0, 3, 64], np.int64),
                   w=rng.standard_normal((64, 64)).astype(np.float32),
                   back=np.array([0, 3, 8, 8], np.int64),
                   head=rng.standard_normal((192, 5)).astype(np.float32))
    with pytest.raises(AugmentError, match="layout of target layer 't'.*ambiguous.*give the "
                                           "layout"):
        augment_model(model, layer="t")
    augmented = augment_model(model, layer="t", layout="nchw")
    assert explained_target(augmented)["layout"] == "nchw"


def test_a_grid_that_does_not_tile_the_image_is_not_a_feature_map():
    """A per-head norm over [N, heads, T, d] (qk-norm) votes channels-last like Swin's maps,
    but its "grid" heads x T gives the image strides 16 and 2: refused as a layout, accepted
    when the user says it is one."""
    graph_text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 32, 32] input) => (float[N, 5] logits) {
        heads = Reshape(input, shape)
        normed = LayerNormalization <axis = -1> (heads, scale)
        pooled = ReduceMean <axes = [1, 2], keepdims = 0> (normed)
        logits = MatMul(pooled, head)
    }"""
    rng = np.random.default_rng(0)
    model = parsed(graph_text,
                   shape=np.array([0, 2, 16, 96], np.int64),
                   scale=np.ones(96, np.float32),
                   head=rng.standard_normal((96, 5)).astype(np.float32))
    with pytest.raises(AugmentError, match=r"read as nhwc has a 2x16 grid .* does not cover the "
                                           r"image with one stride"):
        augment_model(model, layer="normed")
    assert explained_target(augment_model(model, layer="normed", layout="nhwc"))["layout"] == "nhwc"


def test_a_layer_whose_dim0_is_not_the_batch_fails_loudly():
    """A rank-5 qkv tensor and a [T, N, C] tensor: a static dim 0 other than the batch is
    refused when augmenting; one shape inference cannot see fails at run time, never
    silently."""
    model = build(TinyViT)
    exported = export(model)
    graph = onnx.load_from_string(exported).graph
    transposed = next(n.output[0] for n in graph.node
                      if n.op_type == "Transpose" and "blocks.1/attn" in n.name
                      and list(n.attribute[0].ints) == [2, 0, 3, 1, 4])
    with pytest.raises(AugmentError, match=r"rank 5"):
        augment_model(exported, layer=transposed)
    static = onnx.load_from_string(exported)
    with pytest.raises(AugmentError, match=r"shape \[17, \S+, 16\]\) does not have the image "
                                           "batch as dim 0"):
        augment_model(static, layer=_tokens_first_layer(static), layout="tokens",
                      grid=(GRID, GRID), prefix_tokens=1)
    hidden = onnx.load_from_string(exported)
    augmented = augment_model(hidden, layer=_tokens_first_layer(hidden, hide_shape=True),
                              layout="tokens", grid=(GRID, GRID), prefix_tokens=1)
    with pytest.raises(Exception, match="Reshape|shape|Slice"):
        run(augmented, images(), np.array([-1, -1]))


def _tokens_first_layer(model: onnx.ModelProto, hide_shape: bool = False) -> str:
    """A [T, N, C] tensor added to the graph: the last block's input, transposed, feeding the
    score through a transpose back (so the score depends on it). `hide_shape` reshapes it to its
    own run-time shape, so shape inference no longer knows its dims."""
    graph = model.graph
    add = next(n for n in graph.node if n.op_type == "Add" and "blocks.1" in n.name
               and n.name.endswith("Add_1"))
    index = list(graph.node).index(add) + 1
    nodes = [onnx.helper.make_node("Transpose", [add.output[0]], ["moved"], perm=[1, 0, 2])]
    moved = "moved"
    if hide_shape:
        nodes += [onnx.helper.make_node("Shape", ["moved"], ["moved_shape"]),
                  onnx.helper.make_node("Max", ["moved_shape", "moved_shape"], ["same_shape"]),
                  onnx.helper.make_node("Reshape", ["moved", "same_shape"], ["hidden"])]
        moved = "hidden"
    nodes.append(onnx.helper.make_node("Transpose", [moved], ["back"], perm=[1, 0, 2]))
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    for node in graph.node[index + len(nodes):]:
        for i, name in enumerate(node.input):
            if name == add.output[0]:
                node.input[i] = "back"
    return moved
