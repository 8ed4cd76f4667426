"""TensorRT's documented ONNX operator support, as data: what `engines.lint` checks every graph against.

The lint runs without TensorRT: compatibility is checked statically against what NVIDIA documents for the
two targets prunevlm builds for: TensorRT 10.3 (Jetson Orin, JetPack 6) and the current TensorRT 11.x
(datacenter GPUs). The lint never guesses beyond these tables; when the docs are silent (an
operator's types), the check is skipped rather than invented.

Sources:

- onnx/onnx-tensorrt `docs/operators.md`, TensorRT 10.15 revision ("TensorRT 10.15 supports operators in the
  inclusive range of opset 9 to opset 24"; data types DOUBLE, FLOAT32, FLOAT16, BFLOAT16, FP8, FP4, INT32,
  INT64, INT8, INT4, UINT8, BOOL): the full matrix `_OPS_10_15` / `_UNSUPPORTED_10_15` below, types and
  restrictions copied per row. https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
- onnx/onnx-tensorrt `docs/operators.md`, TensorRT 10.0 revision: header only ("opset 9 to opset 20"; data
  types as above without FP4). The 10.3-GA revision itself could not be retrieved here.
- onnx/onnx-tensorrt `docs/Changelog.md` (10.0 ... 10.15 GA): what changed after 10.3, used to derive the
  10.3 table from the 10.15 one: window ops (10.4), STFT (10.5), dynamic Squeeze/Unsqueeze axes (10.7),
  dynamic CumSum axis (10.8), integer Pow (10.8/10.12), Einsum ellipsis/broadcast (10.12), Attention
  (10.14), RotaryEmbedding / RMSNormalization / TensorScatter (10.15); tensor Pad axes (10.4). Also: INT64
  is a native type since 9.0 ("The ONNX parser no longer automatically casts INT64 to INT32"), and dynamic
  TopK K is supported since 8.6.
- NVIDIA/TensorRT release notes v11.0 (Swish), v11.2 (DFT via a cuFFT plugin, 5D GridSample), v11.5 (opset
  25, ONNX 1.22); TensorRT "ONNX Opset Guide" for 11.x (opset 9 and above, maximum 25). No complete 11.x
  operators.md was reachable: the 11 table is the 10.15 matrix plus these documented additions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

# ONNX TensorProto type names -> the names TensorRT's support matrix uses.
ONNX_TO_TRT = {
    "FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "INT32": "INT32", "INT64": "INT64", "INT8": "INT8",
    "UINT8": "UINT8", "BOOL": "BOOL", "FLOAT8E4M3FN": "FP8", "INT4": "INT4", "FLOAT4E2M1": "FP4",
    "DOUBLE": "DOUBLE",
}

# Operators whose output shape depends on the input values. TensorRT 10+ can run some of them (NonZero,
# NonMaxSuppression) only with an output allocator; prunevlm's engines and runtime preallocate every
# buffer from the manifest's static shapes, so these are refused whatever the matrix says.
DATA_DEPENDENT_SHAPE_OPS = frozenset({"NonZero", "Unique", "NonMaxSuppression", "Compress"})


@dataclass(frozen=True)
class OpSupport:
    """One row of the support matrix, plus which inputs its documented restrictions are about."""

    types: frozenset[str] | None  # the "Supported Types" column (TensorRT names); None: not documented
    note: str = ""  # the "Restrictions" column, quoted in findings
    typed_input: int = 0  # the input whose type the column lists (-1: the first output)
    const_inputs: tuple[int, ...] = ()  # inputs that must be build-time constants
    # True where the docs say "must be an initializer": a value that is only constant after folding needs
    # `polygraphy surgeon sanitize --fold-constants` first (a warning); False: "resolvable to a constant".
    const_strict: bool = False


@dataclass(frozen=True)
class Target:
    """A TensorRT version the lint checks against."""

    name: str  # the --trt value: "10.3", "11"
    description: str
    opset_min: int
    opset_max: int
    ops: Mapping[str, OpSupport]
    unsupported: Mapping[str, str]  # operator -> why it is not supported (quoted in findings)
    dtypes: frozenset[str]  # TensorRT type names the parser accepts at all
    topk_k_limit: int  # TopK's K must be less than this ("`K` input must be less than 3840")
    opset_notes: Mapping[int, str] = field(default_factory=dict)  # opsets in range that need a newer minor


_F = "FP32 FP16 BF16"
_FI = "FP32 FP16 BF16 INT32 INT64"
_FIB = "FP32 FP16 BF16 INT32 INT64 BOOL"
_REDUCE = (_FI, "`axes` must be an initializer", 0, (1,), True)

# operator: types, restriction, typed input, constant inputs, strict. Rows marked Y in the 10.15 matrix.
_ROWS_10_15: dict[str, tuple] = {
    "Abs": (_FI,), "Acos": (_F,), "Acosh": (_F,), "Add": (_FI,), "And": ("BOOL",), "ArgMax": (_FI,),
    "ArgMin": (_FI,), "Asin": (_F,), "Asinh": (_F,), "Atan": (_F,), "Atanh": (_F,),
    "Attention": ("FP32 FP16 BF16 INT8 FP8", "`Q`, `K`, `V` and `attn_mask` must be 4D. `past_key`, `past_value` "
                  "and `nonpad_kv_seqlen` inputs are unsupported. `present_key`, `present_value` and "
                  "`qk_matmul_output` outputs are unsupported. `qk_matmul_output_mode` and `softcap` attributes "
                  "are unsupported."),
    "AveragePool": (_F, "2D or 3D Pooling only. `dilations` must be empty or all ones"),
    "BatchNormalization": (_F,), "BlackmanWindow": ("FP32 FP16",),
    "Cast": ("FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",), "CastLike": ("FP32 FP16 BF16 INT32 INT64 UINT8 BOOL",),
    "Ceil": (_F,), "Celu": (_F,), "Clip": (_F,), "Concat": (_FIB,),
    "Constant": ("FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL",
                 "`sparse_value`, `value_string`, and `value_strings` attributes are unsupported.", -1),
    "ConstantOfShape": ("FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL", "", -1),
    "Conv": (_F,), "ConvTranspose": (_F,), "Cos": (_F,), "Cosh": (_F,),
    "CumSum": (_F, "`axis` must be a build-time constant", 0, (1,)),
    "DeformConv": ("FP32 FP16", "`input` must have 1D or 2D spatial dimensions"),
    "DepthToSpace": (_FI,), "DequantizeLinear": ("INT8 FP8 FP4 INT4", "`x_zero_point` must be zero"),
    "Div": (_FI,), "Dropout": (_F, "`is_training` must be an initializer and evaluate to False."),
    "Einsum": (_F,), "Elu": (_F,), "Equal": (_FI,), "Erf": (_F,), "Exp": (_F,), "Expand": (_FIB,),
    "EyeLike": (_FIB, "`input` must have static dimensions"), "Flatten": (_FIB,), "Floor": (_F,),
    "Gather": (_FIB,), "GatherElements": (_FIB,), "GatherND": (_FIB,), "Gelu": ("FP32 FP16 BF16 INT8 INT32 INT64",),
    "Gemm": (_F,), "GlobalAveragePool": (_F,), "GlobalLpPool": (_F,), "GlobalMaxPool": (_F,),
    "Greater": (_FI,), "GreaterOrEqual": (_FI,), "GridSample": ("FP32 FP16", "Input must be 4D input."),
    "GroupNormalization": (_F,), "GRU": (_F,), "HammingWindow": ("FP32 FP16",), "HannWindow": ("FP32 FP16",),
    "HardSigmoid": (_F,), "HardSwish": (_F,), "Hardmax": (_F,), "Identity": (_FIB,),
    "If": (_FIB, "Output tensors of the two conditional branches must have the same rank", 1),
    "ImageScaler": (_F,), "InstanceNormalization": (_F,), "IsInf": (_F,), "IsNaN": (_FI,),
    "LayerNormalization": (_F, "Only the first output `Y` is supported."), "LeakyRelu": (_F,),
    "Less": (_FI,), "LessOrEqual": (_FI,), "Log": (_F,), "LogSoftmax": (_F,),
    "Loop": (_FIB, "Scan output length cannot be dynamic.", 2), "LRN": (_F,), "LSTM": (_F,),
    "LpNormalization": (_F,), "LpPool": (_F,), "MatMul": (_F,), "Max": (_FI,),
    "MaxPool": (_F, "2D or 3D pooling only. `Indices` output tensor unsupported."),
    "Mean": ("FP32 FP16 BF16 FP8 INT32 INT64",), "MeanVarianceNormalization": (_F,), "Min": (_FI,),
    "Mish": ("FP32 FP16",), "Mod": (_FI,), "Mul": (_FI,), "Neg": (_FI,), "NonMaxSuppression": ("FP32 FP16",),
    "NonZero": ("FP32 FP16",), "Not": ("BOOL",),
    "OneHot": (_FIB, "`depth` must be a build-time constant", 0, (1,)), "Or": ("BOOL",), "Pad": (_FI,),
    "ParametricSoftplus": (_F,), "Pow": (_FI,), "PRelu": (_F,),
    "QuantizeLinear": (_F, "`y_zero_point` must be 0"), "RandomNormal": (_F, "", -1),
    "RandomNormalLike": (_F, "", -1), "RandomUniform": (_F, "", -1), "RandomUniformLike": (_F, "", -1),
    "Range": (_FI,), "Reciprocal": (_F,),
    "ReduceL1": _REDUCE, "ReduceL2": _REDUCE, "ReduceLogSum": _REDUCE, "ReduceLogSumExp": _REDUCE,
    "ReduceMax": _REDUCE, "ReduceMean": _REDUCE, "ReduceMin": _REDUCE, "ReduceProd": _REDUCE,
    "ReduceSum": _REDUCE, "ReduceSumSquare": _REDUCE, "Relu": (_FI,), "Reshape": (_FIB,),
    "Resize": (_F, "Supported resize modes: `nearest`, `linear`. Antialiasing is not supported."), "ReverseSequence": (_FIB,),
    "RMSNormalization": (_F,), "RNN": (_F,), "RoiAlign": ("FP32 FP16",),
    "RotaryEmbedding": (_F, "`position_ids` must be INT64"), "Round": (_F,),
    "STFT": ("FP32", "`frame_step` and `window` must be an initializer.", 0, (1, 2), True),
    "ScaledTanh": (_F,), "Scan": (_F,), "Scatter": (_FI,), "ScatterElements": (_FI,),
    "ScatterND": (_FI, "`reduction` other than `none` is not supported"), "Selu": (_F,), "Shape": (_FIB,),
    "Shrink": (_FI,), "Sigmoid": (_F,), "Sign": (_FI,), "Sin": (_F,), "Sinh": (_F,), "Size": (_FIB,),
    "Slice": (_FIB,), "Softmax": (_F,), "Softplus": (_F,), "Softsign": (_F,), "SpaceToDepth": (_FI,),
    "Split": (_FIB,), "Sqrt": (_F,),
    "Squeeze": (_FIB, "`axes` must be resolvable to a constant.", 0, (1,)),
    "Sub": (_FI,), "Sum": (_FI,), "Tan": (_F,), "Tanh": (_F,),
    "TensorScatter": ("FP32 FP16 BF16 INT32", "`past_cache` and `update` must be 4D. `axis` must be -2."),
    "ThresholdedRelu": (_F,), "Tile": (_FIB,),
    "TopK": (_FI, "`sorted` must be 1. `K` input must be less than 3840."), "Transpose": (_FIB,),
    "Trilu": (_FIB,), "Unsqueeze": (_FIB, "`axes` must be resolvable to a constant.", 0, (1,)),
    "Upsample": (_F,), "Where": (_FIB, "", 1), "Xor": ("BOOL",),
}

# Rows marked N in the 10.15 matrix.
_UNSUPPORTED_10_15 = (
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress "
    "ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool "
    "MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement "
    "OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty "
    "SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence "
    "StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique"
).split()

# Parser support added after 10.3, per the onnx-tensorrt changelog: these are unsupported on JetPack 6.
_ADDED_AFTER_10_3 = {
    "BlackmanWindow": "10.4", "HammingWindow": "10.4", "HannWindow": "10.4", "STFT": "10.5",
    "Attention": "10.14", "RotaryEmbedding": "10.15", "RMSNormalization": "10.15", "TensorScatter": "10.15",
}

# Restrictions of 10.3 that later releases lifted (onnx-tensorrt changelog), replacing the 10.15 rows.
_CHANGED_FOR_10_3: dict[str, tuple] = {
    "Squeeze": (_FIB, "`axes` must be an initializer (dynamic axes: TensorRT 10.7)", 0, (1,), True),
    "Unsqueeze": (_FIB, "`axes` must be an initializer (dynamic axes: TensorRT 10.7)", 0, (1,), True),
    "CumSum": (_F, "`axis` must be an initializer (dynamic axis: TensorRT 10.8)", 0, (1,), True),
    "Pad": (_FI, "`axes` must be an initializer (tensor axes: TensorRT 10.4)", 0, (3,), True),
    "Pow": (_F, "integer base or exponent: TensorRT 10.8 / 10.12"),
    "Einsum": (_F, "Ellipsis, diagonal and broadcasting between inputs are not supported (TensorRT 10.12)"),
}

# Parser additions of the 11.x releases (NVIDIA/TensorRT release notes). Types not documented there.
_ADDED_IN_11: dict[str, tuple] = {"Swish": (None, "added in TensorRT 11.0"), "DFT": (None, "TensorRT 11.2 (plugin)")}


def _rows(table: Mapping[str, tuple]) -> dict[str, OpSupport]:
    def support(types: str | None, note: str = "", typed: int = 0, const: tuple[int, ...] = (),
                strict: bool = False) -> OpSupport:
        return OpSupport(frozenset(types.split()) if types else None, note, typed, const, strict)

    return {op: support(*row) for op, row in table.items()}


_BASE_DTYPES = frozenset("DOUBLE FP32 FP16 BF16 INT32 INT64 FP8 INT8 INT4 UINT8 BOOL".split())
_DOCUMENTED_N = "documented as unsupported in onnx-tensorrt operators.md"

_OPS_10_15 = _rows(_ROWS_10_15)
_OPS_10_3 = {op: s for op, s in _OPS_10_15.items() if op not in _ADDED_AFTER_10_3} | _rows(_CHANGED_FOR_10_3)
_UNSUPPORTED_10_3 = {op: _DOCUMENTED_N for op in _UNSUPPORTED_10_15} | {
    op: f"parser support was added in TensorRT {version} (onnx-tensorrt changelog); JetPack 6 ships 10.3"
    for op, version in _ADDED_AFTER_10_3.items()
}
_OPS_11 = _OPS_10_15 | _rows(_ADDED_IN_11)
_UNSUPPORTED_11 = {op: _DOCUMENTED_N for op in _UNSUPPORTED_10_15 if op not in _ADDED_IN_11}

TARGETS: Mapping[str, Target] = MappingProxyType({
    "10.3": Target(
        name="10.3", description="TensorRT 10.3 (Jetson Orin, JetPack 6)", opset_min=9, opset_max=20,
        ops=MappingProxyType(_OPS_10_3), unsupported=MappingProxyType(_UNSUPPORTED_10_3),
        dtypes=_BASE_DTYPES, topk_k_limit=3840,
    ),
    "11": Target(
        name="11", description="TensorRT 11.x (current: 11.5)", opset_min=9, opset_max=25,
        ops=MappingProxyType(_OPS_11), unsupported=MappingProxyType(_UNSUPPORTED_11),
        dtypes=_BASE_DTYPES | {"FP4"}, topk_k_limit=3840,
        opset_notes=MappingProxyType({25: "opset 25 is parsed from TensorRT 11.5 on (release notes); "
                                          "11.0-11.4 stop at 24"}),
    ),
})
TARGET_NAMES: tuple[str, ...] = tuple(TARGETS)


def target(name: str) -> Target:
    """The Target called `name`; a KeyError names the choices (the CLI validates before calling)."""
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown TensorRT target {name!r}; choose from {list(TARGETS)}") from None


__all__ = ["DATA_DEPENDENT_SHAPE_OPS", "ONNX_TO_TRT", "OpSupport", "TARGETS", "TARGET_NAMES", "Target", "target"]
