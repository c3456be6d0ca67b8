"""TensorRT 10.15 ONNX parser operator support (from onnx-tensorrt docs/operators.md,
fa5aa9f61e7781d2ca8f5351d42c1f19525a6124), for the --check-trt report.

Every entry below restates the operator support matrix of that document: whether the parser imports an
operator, the element types listed for it, and the restriction it gives. Where a fact comes from another
file of the same onnx-tensorrt commit (or from the ONNX spec) the comment next to it says so.
"""

TRT_VERSION = "10.15"
OPSET_RANGE = (9, 24)          # inclusive

# The parser accepts the element types DOUBLE (narrowed to FLOAT), FP32, FP16, BF16, INT32, INT64, BOOL, UINT8
# (network inputs and outputs only), and INT8, INT4, FP8, FP4 (only by quantizing from a wider float type).

# ---------------------------------------------------------------------------------------------------------
# Element types per supported operator (the doc's "Supported Types" column).
_F = ("FP32", "FP16", "BF16")
_FI = _F + ("INT32", "INT64")
_FIB = _FI + ("BOOL",)
_HALF = ("FP32", "FP16")
_CONST = ("FP32", "FP16", "BF16", "FP8", "FP4", "INT4", "INT32", "INT64", "BOOL")

_TYPE_GROUPS = {
    _F: """Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos
        Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
        GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf
        LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool
        MeanVarianceNormalization ParametricSoftplus PRelu QuantizeLinear RandomNormal RandomNormalLike
        RandomUniform RandomUniformLike Reciprocal Resize RMSNormalization RNN RotaryEmbedding Round ScaledTanh
        Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample""",
    _FI: """Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min
        Mod Mul Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
        ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub
        Sum TopK""",
    _FIB: """Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape
        ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where""",
    _HALF: "BlackmanWindow DeformConv GridSample HammingWindow HannWindow Mish NonMaxSuppression NonZero RoiAlign",
    ("BOOL",): "And Not Or Xor",
    _F + ("INT32", "INT64", "UINT8", "BOOL"): "Cast CastLike",
    _CONST: "Constant ConstantOfShape",
    ("FP32", "FP16", "BF16", "INT8", "FP8"): "Attention",
    ("INT8", "FP8", "FP4", "INT4"): "DequantizeLinear",
    ("FP32", "FP16", "BF16", "INT8", "INT32", "INT64"): "Gelu",
    ("FP32", "FP16", "BF16", "FP8", "INT32", "INT64"): "Mean",
    ("FP32",): "STFT",
    ("FP32", "FP16", "BF16", "INT32"): "TensorScatter",
}
SUPPORTED_TYPES: dict[str, tuple[str, ...]] = {
    op: types for types, names in _TYPE_GROUPS.items() for op in names.split()}

# ---------------------------------------------------------------------------------------------------------
# Per-operator data limits (numbers and allowed attribute values).
TOPK_MAX_K = 3840              # the doc's bound on TopK's K input: "less than", so K == TOPK_MAX_K is out of range
TOPK_SORTED_VALUES = frozenset({1})   # only sorted=1; there is no ONNX Sort op, TopK is the sorting primitive

SCATTER_ELEMENTS_REDUCTIONS = frozenset({"none", "add", "mul", "max", "min"})
# ^ the matrix puts no restriction on ScatterElements; reduction support was added in 10.0 (docs/Changelog.md)
#   and 10.3 moved the importer onto an updated plugin, so every ONNX reduction value is accepted.
TENSOR_SCATTER_RANK = 4        # past_cache and update
TENSOR_SCATTER_AXIS = -2

# ArgMax/ArgMin: the matrix lists no restriction. importerUtils.cpp (argMinMaxHelper, same commit) lowers them
# to a k=1 TopK and handles select_last_index=1 by reversing the reduced axis, so both values import.

REDUCE_OPS = frozenset({"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"})

# Attention first appears in opset 23 (the ONNX spec; the doc names no opset).
ATTENTION_RANK = 4             # Q, K, V and attn_mask

POOL_DILATIONS = "empty or all ones"  # AveragePool, MaxPool, LpPool
GRID_SAMPLE_RANK = 4

# ---------------------------------------------------------------------------------------------------------
# op_type -> restriction note ("" when the matrix gives none). Only operators the doc marks supported.
_NOTES = {
    "Attention": f"Q/K/V/attn_mask must be {ATTENTION_RANK}-D; no past_key/past_value/nonpad_kv_seqlen inputs, "
                 "no present_key/present_value/qk_matmul_output outputs, no qk_matmul_output_mode/softcap; "
                 "head counts are read from dim 1 of Q and K/V",
    "AveragePool": f"2-D or 3-D pooling only; dilations {POOL_DILATIONS}",
    "Constant": "sparse_value, value_string and value_strings attributes are not accepted",
    "CumSum": "axis has to be known at build time",
    "DeformConv": "1-D or 2-D spatial input only; begin and end pads equal on each spatial axis",
    "DequantizeLinear": "x_zero_point has to be zero",
    "Dropout": "is_training has to be an initializer that is False",
    "EyeLike": "input dimensions have to be static",
    "GridSample": f"input has to be {GRID_SAMPLE_RANK}-D",
    "GRU": "bidirectional: forward and reverse activations have to match",
    "Hardmax": "size of the axis dimension has to be known at build time",
    "If": "both branches' outputs need equal rank and distinct names",
    "LayerNormalization": "only the first output (Y) is supported",
    "Loop": "scan output length cannot be dynamic; loop-carried shapes must not change between iterations",
    "LpPool": f"dilations {POOL_DILATIONS}",
    "LSTM": "bidirectional: forward and reverse activations have to match; input_forget=0 and layout=0 only",
    "MaxPool": f"2-D or 3-D pooling only; no Indices output; dilations {POOL_DILATIONS}",
    "OneHot": "depth has to be known at build time",
    "QuantizeLinear": "y_zero_point has to be zero",
    "RandomNormal": "seed is ignored",
    "RandomNormalLike": "seed is ignored",
    "RandomUniform": "seed is ignored",
    "RandomUniformLike": "seed is ignored",
    "Resize": "modes nearest/linear; coordinate modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, "
              "asymmetric, align_corners; nearest modes floor/ceil/round_prefer_floor/round_prefer_ceil; "
              "keep_aspect_ratio_policy stretch only; with a scales tensor, axes must be 0..rank-1 in order; "
              "no antialias",
    "RNN": "bidirectional: forward and reverse activations have to match",
    "RotaryEmbedding": "position_ids has to be INT64",
    "STFT": "frame_step and window have to be initializers; real-valued input only",
    "ScatterND": "only reduction='none'",
    "Squeeze": "axes has to resolve to a constant",
    "TensorScatter": f"past_cache and update must be {TENSOR_SCATTER_RANK}-D; axis must be {TENSOR_SCATTER_AXIS}",
    "TopK": f"sorted=1 only; K must be below {TOPK_MAX_K}",
    "Unsqueeze": "axes has to resolve to a constant",
}
_NOTES.update({op: "axes has to be an initializer" for op in REDUCE_OPS})

SUPPORTED: dict[str, str] = {op: _NOTES.get(op, "") for op in sorted(SUPPORTED_TYPES)}
assert set(_NOTES) <= set(SUPPORTED), set(_NOTES) - set(SUPPORTED)


# ---------------------------------------------------------------------------------------------------------
# op_type -> why not. Operators the doc marks unsupported (N).
_NO_IMPORTER = "no importer in the ONNX-TensorRT parser"
UNSUPPORTED: dict[str, str] = {op: _NO_IMPORTER for op in """AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot
    BitwiseOr BitwiseXor CenterCropPad Col2Im Compress ConvInteger DFT Det ImageDecoder MatMulInteger MaxRoiPool
    MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss QLinearConv QLinearMatMul
    SoftmaxCrossEntropyLoss TfIdfVectorizer Unique""".split()}
UNSUPPORTED.update({op: "sequence/optional types are not imported" for op in """ConcatFromSequence Optional
    OptionalGetElement OptionalHasElement SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert
    SequenceLength SequenceMap SplitToSequence""".split()})
UNSUPPORTED.update({op: "string tensors are not imported" for op in
                    "RegexFullMatch StringConcat StringNormalizer StringSplit".split()})
UNSUPPORTED["DynamicQuantizeLinear"] = ("no importer; build it from ONNX ops inside a model-local function "
                                        "to reach TensorRT's IDynamicQuantize")
assert not set(UNSUPPORTED) & set(SUPPORTED)
