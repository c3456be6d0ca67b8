"""TensorRT's ONNX parser operator support, for the --check-trt report. From onnx-tensorrt's
docs/operators.md: the operator matrix of its TensorRT 8.5 version (commit 6d0ab7be), the opset range of
its 10.0 header (9 to 20), LayerNormalization (parsed natively since 8.6), and TopK's K limit of 3840
from TensorRT's ITopKLayer. ScatterElements with a reduction goes through TensorRT's scatterElements
plugin (libnvinfer_plugin) rather than the core parser."""

TRT_VERSION = "10.0"
OPSET_RANGE = (9, 20)
TOPK_MAX_K = 3840
# reduction="none" is TensorRT core; the others are served by the scatterElements plugin.
SCATTER_ELEMENTS_REDUCTIONS = {"none", "add", "mul", "max", "min"}

_PLAIN = """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh BatchNormalization Cast Ceil Celu Clip Concat
Constant ConstantOfShape Conv ConvTranspose Cos Cosh DepthToSpace Div Dropout Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample HardSwish HardSigmoid Identity ImageScaler IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LpNormalization LpPool MatMul Max Mean MeanVarianceNormalization Min Mod Mul
Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size
Softmax Softplus Softsign SpaceToDepth Split Sqrt Sub Sum Tan Tanh ThresholdedRelu Tile Transpose Trilu Upsample
Where Xor"""

SUPPORTED: dict[str, str] = {name: "" for name in _PLAIN.split()}
SUPPORTED.update({
    "AveragePool": "2-D or 3-D pooling only",
    "CumSum": "axis must be an initializer",
    "DequantizeLinear": "x_zero_point must be zero",
    "QuantizeLinear": "y_zero_point must be zero",
    "Einsum": "no ellipsis, diagonal or broadcasting between inputs",
    "GRU": "bidirectional: the same activations both ways",
    "LSTM": "bidirectional: the same activations both ways",
    "RNN": "bidirectional: the same activations both ways",
    "If": "both branches' outputs broadcastable and differently named",
    "InstanceNormalization": "scale and B initializers, input rank 3 to 5",
    "MaxPool": "2-D or 3-D pooling only, no Indices output",
    "RandomNormal": "seed ignored", "RandomNormalLike": "seed ignored",
    "RandomUniform": "seed ignored", "RandomUniformLike": "seed ignored",
    "Resize": "modes nearest/linear; listed coordinate transformation modes only",
    "ReverseSequence": "static input shapes only",
    "Slice": "axes must be an initializer",
    "Squeeze": "axes must be an initializer",
    "Unsqueeze": "axes must be a constant",
    "TopK": f"K must be an initializer, at most {TOPK_MAX_K}",
})

UNSUPPORTED: dict[str, str] = {name: "not implemented by the ONNX-TensorRT parser" for name in """Bernoulli BitShift
BlackmanWindow Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow HannWindow Hardmax
IsInf MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional
OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul STFT SequenceAt SequenceConstruct SequenceEmpty
SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringNormalizer
TfIdfVectorizer Unique""".split()}
