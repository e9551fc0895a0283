"""Emitting new nodes into an existing ONNX graph.

`GraphBuilder` is the one place that appends nodes, constants and outputs to the graph being
augmented. It hands out unique tensor names, keeps emitted ops in the default ``ai.onnx`` domain at
the model's opset, and knows the static rank and element type of forward tensors (from shape
inference) so rules can ask for them. Shapes are never trusted beyond rank: rules read sizes with
``Shape`` at run time, because exporters (TF-style "same" padding, dynamic batch) leave them
unknown.

Half precision: the backward pass and the CAM math of a float16 or bfloat16 model run in float32
(`compute_type`). Each half-precision forward tensor they read is cast once (`computed`), so no
float32 constant meets a half tensor and small gradients keep their precision (at
EfficientNet-Lite0's last layer 27 % of the probability score's nonzero gradients lie under
float16's smallest normal number, 6.1e-5); the heatmaps then match those of the float32 network
holding the float16 weights (r 1.0000, docs/ZOO.md), at the cost of one Cast per forward tensor
read (guided backprop on EfficientNet-Lite0: 74 ms in float16, 49 ms in float32). What is fed back
into the network itself (a perturbation method's ablated layer or masked images, the transformed
copies of the image) is computed in float32 too and cast to the type of the tensor it replaces
(`LoopBody.cast_like`), so no new op computes in half precision: onnxruntime's CPU provider has
bfloat16 kernels for data movement only (Cast, Reshape, Transpose, Slice, Concat, ...).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import AugmentError

MAX_COPIED_WEIGHT_BYTES = 256 * 2**20  # weights Loop bodies may copy in all (`LoopBody.clone`)
_NOT_CONSTANT = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                 "Multinomial", "Bernoulli"}
_GRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
# Ops whose outputs have the rank of input 0, and elementwise ops broadcasting their inputs
# (`GraphBuilder.infer_new_types`).
_RANK_OF_FIRST = {"Split", "Pad", "Identity", "Neg", "Abs", "Relu", "Exp", "Log", "Sqrt",
                  "Reciprocal", "Sigmoid", "Tanh", "Sign", "Cast", "Clip", "Softmax"}
_BROADCAST_RANK = {"Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean", "Where"}
HALF_TYPES = frozenset({TensorProto.FLOAT16, TensorProto.BFLOAT16})
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, *HALF_TYPES})


class GraphBuilder:
    """Appends nodes to `model.graph`; every name it creates starts with `prefix`."""

    def __init__(self, model: onnx.ModelProto, prefix: str = "gradcam") -> None:
        self.model = model
        self.graph = model.graph
        self.opset = opset_version(model)
        self.prefix = prefix
        self._counter = itertools.count()
        self._constants: dict[tuple, str] = {}
        self._taken = tensor_names(self.graph)
        self.copied_weight_bytes = 0  # by `LoopBody.clone`, for all bodies together
        self._computed: dict[str, str] = {}  # half-precision tensor -> its float32 cast
        self._cast_sources: dict[str, str] = {}  # and back
        self.types: dict[str, onnx.TypeProto] = {}
        # a one-hot tensor [N, K] (1 at each row's index on the last axis, 0 elsewhere) -> its
        # indices [N]: a rule may gather the rows it would otherwise multiply by (Gemm)
        self.one_hot_rows: dict[str, str] = {}
        # a heatmap [N, H, W] of `cam.cam_heatmap` -> the map it resized [N, 1, h, w] and the
        # min and span [N, 1, 1, 1] that normalised it (`cam.coarse_heatmap`)
        self.upsampled_heatmaps: dict[str, tuple[str, str, str]] = {}
        self._types_at_batch_one: dict[str, onnx.TypeProto] | None = None
        inferred = infer_shapes(model)
        for value in itertools.chain(
            inferred.graph.input, inferred.graph.output, inferred.graph.value_info
        ):
            self.types[value.name] = value.type
        for init in self.graph.initializer:
            self.types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))

    def infer_new_types(self) -> None:
        """Run shape inference again and learn the types of the tensors appended since (the
        builder starts knowing the forward graph's only): what a second reverse pass over
        the nodes of a first one needs (`hessian.py`). Known types are kept."""
        inferred = infer_shapes(self.model)
        for value in itertools.chain(inferred.graph.output, inferred.graph.value_info):
            self.types.setdefault(value.name, value.type)
        self._propagate_ranks()

    def _propagate_ranks(self) -> None:
        """Where onnx's inference stops (a Split whose sizes are computed, and everything after
        it), the ranks and types that elementwise, Split and Pad nodes keep: the tensor typed
        with its rank and unknown dims."""
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            typed = [t for t in node.input if t and self._has_shape(t)]
            if node.op_type in _RANK_OF_FIRST and node.input and self._has_shape(node.input[0]):
                rank, source = self.rank(node.input[0]), node.input[0]
            elif node.op_type in _BROADCAST_RANK and node.input and len(typed) == len(
                    [t for t in node.input if t]):
                rank = max(self.rank(t) for t in typed)
                source = node.input[1] if node.op_type == "Where" else node.input[0]
            else:
                continue
            for output in node.output:
                if output and not self._has_shape(output):
                    self.types[output] = helper.make_tensor_type_proto(
                        self.elem_type(source), [None] * rank)

    def _has_shape(self, tensor: str) -> bool:
        tensor_type = self.types.get(tensor)
        return tensor_type is not None and tensor_type.tensor_type.HasField("shape")

    # -- names -------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A tensor or node name not used anywhere in the graph."""
        while True:
            name = f"{self.prefix}/{hint}_{next(self._counter)}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    # -- facts about forward tensors ---------------------------------------------------------
    def rank(self, tensor: str) -> int:
        """Static rank of `tensor`; raises when shape inference could not tell it."""
        tensor_type = self.types.get(tensor)
        if tensor_type is None or not tensor_type.tensor_type.HasField("shape"):
            raise AugmentError(f"the rank of tensor {tensor!r} is unknown after shape inference")
        return len(tensor_type.tensor_type.shape.dim)

    def static_shape(self, tensor: str) -> tuple[int | str | None, ...] | None:
        """Static dims of `tensor`: an int where known, the symbol's name for a named symbolic
        dim, None for an unknown one; None altogether if the rank is unknown."""
        return _static_dims(self.types.get(tensor))

    def static_shape_at_batch_one(self, tensor: str) -> tuple[int | str | None, ...] | None:
        """`static_shape` as shape inference finds it with the batch of every graph input fixed
        to 1: a dim computed from the input's shape (a token count after Shape, Gather and
        Reshape) is then known wherever the input's other dims are static, where the batch's
        symbol kept it unknown. Inferred once, on first use."""
        if self._types_at_batch_one is None:
            inferred = infer_shapes(self.model, batch_one=True)
            self._types_at_batch_one = {
                value.name: value.type
                for value in itertools.chain(inferred.graph.output, inferred.graph.value_info)
            }
        return _static_dims(self._types_at_batch_one.get(tensor))

    def elem_type(self, tensor: str) -> int:
        tensor_type = self.types.get(tensor)
        if tensor_type is None or not tensor_type.tensor_type.elem_type:
            return TensorProto.FLOAT
        return tensor_type.tensor_type.elem_type

    def compute_type(self, tensor: str) -> int:
        """The element type in which the backward pass and the CAM math handle `tensor`:
        FLOAT for a half-precision tensor (FLOAT16, BFLOAT16), its own type otherwise."""
        elem_type = self.elem_type(tensor)
        return TensorProto.FLOAT if elem_type in HALF_TYPES else elem_type

    def computed(self, tensor: str) -> str:
        """`tensor` in its `compute_type`: a half-precision tensor cast to FLOAT (once per
        tensor; the cast's type is known to the builder, and `shape` reads the source's shape,
        so a cast read only for its shape is dropped by `drop_unused_casts`), any other
        tensor itself."""
        if self.elem_type(tensor) not in HALF_TYPES:
            return tensor
        if tensor not in self._computed:
            cast = self.op("Cast", [tensor], to=TensorProto.FLOAT)
            tensor_type = onnx.TypeProto()
            tensor_type.CopyFrom(self.types[tensor])
            tensor_type.tensor_type.elem_type = TensorProto.FLOAT
            self.types[cast] = tensor_type
            self._computed[tensor] = cast
            self._cast_sources[cast] = tensor
        return self._computed[tensor]

    def drop_unused_casts(self) -> None:
        """Remove the casts of `computed` that nothing reads (in the graph, its subgraphs or
        its outputs)."""
        unused = set(self._cast_sources) - read_names(self.graph)
        if unused:
            self._remove_nodes(node for node in self.graph.node
                               if node.op_type == "Cast" and node.output[0] in unused)

    def write_outputs_directly(self) -> None:
        """Let the node that computes an added output write it under the output's name, and
        drop the Identity `add_output` put in between: a runtime runs every node whether its
        output is fetched or not, and copies at an Identity (1 MB a batch of 4 for a CNN's
        last layer, twice: activations and gradients). Only a tensor this builder computed in
        the main graph is renamed, wherever it is read (subgraphs too)."""
        outputs = {output.name for output in self.graph.output}
        computed = computed_tensors(self.graph)
        renamed: dict[str, str] = {}
        folded = []
        for node in self.graph.node:
            source = node.input[0] if node.op_type == "Identity" else ""
            if (node.output[0] in outputs and source.startswith(f"{self.prefix}/")
                    and source in computed and source not in outputs
                    and source not in renamed):
                renamed[source] = node.output[0]
                folded.append(node)
        if not renamed:
            return
        self._remove_nodes(folded)
        _rename_reads(self.graph, renamed)
        for node in self.graph.node:
            node.output[:] = [renamed.get(name, name) for name in node.output]
        for value in self.graph.value_info:
            value.name = renamed.get(value.name, value.name)

    def _remove_nodes(self, nodes) -> None:
        """Remove `nodes` (of this graph) and keep the others' order."""
        nodes = list(nodes)  # held, so that no other node's wrapper can take one's id
        removed = {id(node) for node in nodes}
        kept = [node for node in self.graph.node if id(node) not in removed]
        del self.graph.node[:]
        self.graph.node.extend(kept)

    def initializer_value(self, tensor: str) -> np.ndarray | None:
        """The value of `tensor` if it is an initializer or a Constant node's output."""
        for init in self.graph.initializer:
            if init.name == tensor:
                return numpy_helper.to_array(init)
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output[0] == tensor:
                return numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
        return None

    # -- emitting ----------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], num_outputs: int = 1, **attrs) -> str:
        """Append one `ai.onnx` node; returns its (first) output name."""
        return self.op_multi(op_type, inputs, num_outputs, **attrs)[0]

    def op_multi(
        self, op_type: str, inputs: Sequence[str], num_outputs: int, **attrs
    ) -> list[str]:
        hint = op_type.lower()
        outputs = [self.fresh(hint) for _ in range(num_outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node = helper.make_node(op_type, list(inputs), outputs, name=self.fresh(hint), **attrs)
        self.graph.node.append(node)
        return outputs

    def const(self, value, dtype=np.float32) -> str:
        """A constant tensor (deduplicated by dtype, shape and value)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.name, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh("const")
            self.graph.initializer.append(numpy_helper.from_array(array, name))
            self.types[name] = helper.make_tensor_type_proto(
                helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)
            )
            self._constants[key] = name
        return self._constants[key]

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64)

    def clone(self, nodes: Sequence[onnx.NodeProto], renamed: dict[str, str]) -> list:
        """Copies of `nodes` for a subgraph body: inputs renamed through `renamed` (which
        seeds the substitutions, e.g. the tensor the copy starts from, and collects each
        copied output's fresh name); names not in it stay, read from the outer scope."""
        copies = []
        for node in nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = self.fresh("copy")
            for i, name in enumerate(copy.input):
                copy.input[i] = renamed.get(name, name)
            for i, name in enumerate(copy.output):
                if name:
                    renamed[name] = copy.output[i] = self.fresh("copy")
            copies.append(copy)
        return copies

    def constant_inputs(
        self, nodes: Sequence[onnx.NodeProto], bound: set[str]
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """What `nodes` read from the graph that depends on initializers alone (not on a graph
        input, and not on a name in `bound`): the graph nodes computing those tensors, in
        graph order, and the initializers at their roots."""
        initializers = {init.name: init for init in self.graph.initializer}
        producers = {out: node for node in self.graph.node for out in node.output}
        inside = {out for node in nodes for out in node.output}
        constant = set(initializers) - bound
        for node in self.graph.node:  # in topological order, as ONNX requires
            if (
                node.op_type not in _NOT_CONSTANT
                and not any(a.type in _GRAPH_ATTRIBUTES for a in node.attribute)
                and all(name in constant for name in node.input if name)
            ):
                constant.update(name for name in node.output if name not in bound)

        roots: dict[str, onnx.TensorProto] = {}
        needed: set[int] = set()
        pending = [
            name for node in nodes for name in node.input
            if name and name not in inside and name in constant
        ]
        while pending:
            tensor = pending.pop()
            if tensor in initializers:
                roots[tensor] = initializers[tensor]
            elif id(producer := producers[tensor]) not in needed:
                needed.add(id(producer))
                pending.extend(name for name in producer.input if name)
        ancestors = [node for node in self.graph.node if id(node) in needed]
        return ancestors, list(roots.values())

    def add_output(self, tensor: str, name: str, elem_type: int, shape: Sequence) -> None:
        """Expose `tensor` as graph output `name` (through Identity when the names differ)."""
        if name in tensor_names(self.graph) and name != tensor:
            raise AugmentError(
                f"the model already has a tensor named {name!r}; it is reserved for the "
                "augmented output of that name"
            )
        if name != tensor:
            self.graph.node.append(helper.make_node("Identity", [tensor], [name], name=name))
        self.graph.output.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    # -- shape helpers used by many rules ----------------------------------------------------
    def shape(self, tensor: str) -> str:
        return self.op("Shape", [self._cast_sources.get(tensor, tensor)])

    def shape_slice(self, tensor: str, start: int, end: int | None = None) -> str:
        end_attr = {} if end is None else {"end": end}
        return self.op("Shape", [self._cast_sources.get(tensor, tensor)], start=start, **end_attr)

    def zeros_like(self, tensor: str) -> str:
        return self.op(
            "ConstantOfShape",
            [self.shape(tensor)],
            value=helper.make_tensor("zero", self.elem_type(tensor), [1], [0]),
        )

    def reduce(self, op_type: str, tensor: str, axes: Sequence[int], keepdims: bool) -> str:
        """ReduceSum/ReduceMean/ReduceMax over constant axes at this model's opset."""
        if axes_are_input(op_type, self.opset):
            return self.op(op_type, [tensor, self.ints(axes)], keepdims=int(keepdims))
        return self.op(op_type, [tensor], axes=list(axes), keepdims=int(keepdims))

    def sum_to_shape(self, grad: str, like: str, grad_like: str | None = None) -> str:
        """Sum `grad` down to the shape of forward tensor `like` (undoing numpy broadcasting).

        `grad_like` is a forward tensor with the shape `grad` has. Where the static shapes of the
        two decide which axes were broadcast, the reduction is built statically (nothing at all
        when none were); otherwise the axes are found at run time: leading axes `like` lacks,
        and axes where `like` has size 1 and `grad` does not.
        """
        axes = self._broadcast_axes(like, grad_like) if grad_like is not None else None
        if axes is not None:
            if not axes:
                return grad
            summed = self.reduce("ReduceSum", grad, axes, keepdims=True)
            return self.op("Reshape", [summed, self.shape(like)])
        rank_like = self.rank(like)
        grad_shape = self.shape(grad)
        rank_grad = self.op("Size", [grad_shape])
        missing = self.op("Sub", [rank_grad, self.ints([rank_like])])
        leading_ones = self.op(
            "ConstantOfShape",
            [missing],
            value=helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        )
        padded = self.op("Concat", [leading_ones, self.shape(like)], axis=0)
        one = self.ints([1])
        broadcast = self.op(
            "And",
            [self.op("Equal", [padded, one]), self.op("Not", [self.op("Equal", [grad_shape, one])])],
        )
        axes_tensor = self.op("Reshape", [self.op("NonZero", [broadcast]), self.ints([-1])])
        summed = self.op(
            "ReduceSum", [grad, axes_tensor], keepdims=1, noop_with_empty_axes=1
        )
        return self.op("Reshape", [summed, self.shape(like)])

    def _broadcast_axes(self, like: str, grad_like: str) -> list[int] | None:
        """Axes of `grad_like` that were broadcast from `like`, or None if undecidable."""
        small, large = self.static_shape(like), self.static_shape(grad_like)
        if small is None or large is None or len(small) > len(large):
            return None
        offset = len(large) - len(small)
        axes = list(range(offset))
        for i, dim in enumerate(small):
            big = large[offset + i]
            if dim == big and dim is not None:
                continue
            if dim == 1:
                axes.append(offset + i)  # summing a size-1 axis is harmless if it was one
            elif not isinstance(dim, int):
                return None  # `like` may be 1 along this axis at run time
        return axes

    def unsqueeze(self, tensor: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", [tensor, self.ints(axes)])

    def squeeze(self, tensor: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", [tensor, self.ints(axes)])


class LoopBody:
    """The body of an ONNX Loop with one scan output, built node by node.

    The body reads ``step`` (the INT64 iteration number) and may read any tensor of the outer
    graph; `loop` appends the Loop node running it `count` times and returns its scan output,
    the per-iteration outputs stacked along a new first axis.
    """

    def __init__(self, b: GraphBuilder, hint: str) -> None:
        self.b = b
        self.hint = hint
        self.step = b.fresh(f"{hint}_step")
        self._condition = b.fresh(f"{hint}_condition")
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def op(self, op_type: str, inputs: Sequence[str], **attrs) -> str:
        output = self.b.fresh(op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [output], name=self.b.fresh(op_type), **attrs)
        )
        return output

    def const(self, value, dtype=np.float32) -> str:
        """A constant of the outer graph, which the body reads (`GraphBuilder.const`)."""
        return self.b.const(value, dtype)

    def reduce(self, op_type: str, tensor: str, axes: Sequence[int], keepdims: bool) -> str:
        """As `GraphBuilder.reduce`, inside the body."""
        if axes_are_input(op_type, self.b.opset):
            return self.op(op_type, [tensor, self.b.ints(axes)], keepdims=int(keepdims))
        return self.op(op_type, [tensor], axes=list(axes), keepdims=int(keepdims))

    def computed(self, tensor: str, like: str) -> str:
        """Body tensor `tensor`, of the outer tensor `like`'s type (its copy in the body), in
        `like`'s compute type (`GraphBuilder.computed`)."""
        if self.b.compute_type(like) == self.b.elem_type(like):
            return tensor
        return self.op("Cast", [tensor], to=self.b.compute_type(like))

    def cast_like(self, tensor: str, like: str) -> str:
        """Body tensor `tensor`, in `like`'s compute type, cast to `like`'s own type: what the
        body feeds to a copy of the network where `like` was read."""
        if self.b.compute_type(like) == self.b.elem_type(like):
            return tensor
        return self.op("Cast", [tensor], to=self.b.elem_type(like))

    def clone(self, nodes: Sequence[onnx.NodeProto], renamed: dict[str, str]) -> None:
        """Copies of forward `nodes` into the body (see `GraphBuilder.clone`).

        The weights they read become the body's own initializers: outer initializers are
        copied in, and outer tensors computed from initializers alone (an exporter's Identity
        of a shared bias, a constant Reshape shape) are recomputed in the body. onnxruntime
        pre-packs convolution weights into its blocked NCHWc layout only when they are
        constant in the graph that runs the Conv, and an outer-scope tensor is not; with local
        copies a masked forward pass runs as fast as the main graph's (ResNet-50: 1.5x faster)
        for one more copy of those weights in the model and in the session (which holds about
        four bytes per weight byte: ResNet-50's Score-CAM session 831 MB resident instead of
        440 MB). Once the bodies of the model would copy more than `MAX_COPIED_WEIGHT_BYTES`
        in all (several fused layers each have a body), a body reads the outer weights
        instead, to bound that memory and keep the model under protobuf's 2 GiB.
        """
        ancestors, initializers = self.b.constant_inputs(nodes, set(renamed))
        size = sum(_nbytes(i) for i in initializers)
        if self.b.copied_weight_bytes + size <= MAX_COPIED_WEIGHT_BYTES:
            self.b.copied_weight_bytes += size
            for init in initializers:
                local = onnx.TensorProto()
                local.CopyFrom(init)
                local.name = renamed[init.name] = self.b.fresh("weight")
                self.initializers.append(local)
            self.nodes.extend(self.b.clone(ancestors, renamed))
        self.nodes.extend(self.b.clone(nodes, renamed))

    def loop(self, count: str, output: str, elem_type: int, shape: Sequence) -> str:
        """Run the body `count` (INT64 scalar) times; `output` [shape] is its scan output."""
        b = self.b
        condition_out = self.op("Identity", [self._condition])
        body = helper.make_graph(
            self.nodes,
            b.fresh(f"{self.hint}_body"),
            [helper.make_tensor_value_info(self.step, TensorProto.INT64, []),
             helper.make_tensor_value_info(self._condition, TensorProto.BOOL, [])],
            [helper.make_tensor_value_info(condition_out, TensorProto.BOOL, []),
             helper.make_tensor_value_info(output, elem_type, list(shape))],
            initializer=self.initializers,
        )
        return b.op("Loop", [count, b.const(True, dtype=bool)], body=body)


def _nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims, dtype=np.int64))
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def axes_are_input(op_type: str, opset: int) -> bool:
    """Whether a Reduce* op takes its axes as an input (ReduceSum from opset 13, the others
    from 18) rather than as an attribute."""
    return op_type == "ReduceSum" and opset >= 13 or opset >= 18


def opset_version(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise AugmentError("the model imports no ai.onnx opset")


def tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in itertools.chain(graph.input, graph.output, graph.value_info)}
    names.update(init.name for init in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def computed_tensors(graph: onnx.GraphProto) -> set[str]:
    """The tensors a graph's inputs and nodes give (initializers only where also inputs)."""
    names = {i.name for i in graph.input}
    for node in graph.node:
        names.update(node.output)
    return names


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs `node` holds as attributes (a Loop's or Scan's body, an If's branches)."""
    return [body for attribute in node.attribute
            for body in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH
                         else attribute.graphs)]


def _rename_reads(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    """Rename the tensors `graph`'s nodes, and its subgraphs' nodes, read."""
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        for body in subgraphs(node):
            _rename_reads(body, renamed)


def read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name that a node of `graph` or of its subgraphs reads, and its outputs."""
    names = {output.name for output in graph.output}
    for node in graph.node:
        names.update(node.input)
        for body in subgraphs(node):
            names.update(read_names(body))
    return names


def model_bytes(model: onnx.ModelProto) -> int:
    """The serialized size of `model`, near enough: its initializers' and nodes' sizes summed
    (protobuf's own ByteSize fails on a model over 2 GiB, the case this is asked for)."""
    graph = model.graph
    return sum(t.ByteSize() for t in graph.initializer) + sum(n.ByteSize() for n in graph.node)


# Protobuf cannot serialize 2 GiB; larger models keep their weights in a data file beside them.
_SINGLE_FILE_LIMIT_BYTES = 1_800_000_000


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` to `path` (its folder made as needed): one file, or past protobuf's 2 GiB
    the weights in ``<file name>.data`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if model_bytes(model) < _SINGLE_FILE_LIMIT_BYTES:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data")


def _static_dims(tensor_type: onnx.TypeProto | None) -> tuple[int | str | None, ...] | None:
    if tensor_type is None or not tensor_type.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in tensor_type.tensor_type.shape.dim
    )


_WEIGHT_ELEMENTS = 4096  # initializers larger than this are weights, never shapes or indices


def infer_shapes(model: onnx.ModelProto, batch_one: bool = False) -> onnx.ModelProto:
    """Shape inference that tolerates models whose shapes cannot all be inferred.

    It runs on a skeleton of the model whose large initializers (weights) are typed graph
    inputs: their values never decide a shape, and without them a model over protobuf's 2 GiB
    limit (ViT-H/14) can be inferred at all, and any model faster. With `batch_one`, the
    skeleton's graph inputs have a symbolic dim 0 fixed to 1, and the model's own value_info
    (symbolic shapes an exporter wrote) is left out, so that dims computed from the input's
    shape can be propagated."""
    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = model.graph
    skeleton.graph.name = graph.name
    skeleton.graph.node.extend(graph.node)
    skeleton.graph.input.extend(graph.input)
    skeleton.graph.output.extend(graph.output)
    if batch_one:
        for value in [*skeleton.graph.input, *skeleton.graph.output]:
            dims = value.type.tensor_type.shape.dim
            if dims and not dims[0].HasField("dim_value"):
                dims[0].dim_value = 1
    else:
        skeleton.graph.value_info.extend(graph.value_info)
    declared = {value.name for value in graph.input}
    for init in graph.initializer:
        if math.prod(init.dims) <= _WEIGHT_ELEMENTS:
            skeleton.graph.initializer.append(init)
        elif init.name not in declared:
            skeleton.graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    try:
        return onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:  # noqa: BLE001 - partial information is still useful
        return onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
