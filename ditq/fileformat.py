"""The exported model file's contract: file names, opsets, target names, ``metadata_props`` keys and the
ONNX Runtime session setting a model records. Torch-free: the ONNX Runtime side (ditq.runtime) and the
CLI's parser read these without importing the exporter."""

TARGETS = ("qdq", "ort")  # portable QDQ graph | ONNX Runtime low-bit kernels (ditq.graphs.lower_ort)
DEFAULT_OPSET = 21  # blocked QuantizeLinear/DequantizeLinear and int4/uint4 (ONNX opset 21)
INT2_OPSET, INT2_IR = 25, 13  # the first opset / IR version with INT2/UINT2 tensors (2-bit weight codes)
# The highest opset an export may be written at: the highest ditq's exports are tested at (21 and 25,
# traced and validated). ONNX Runtime has no API that says which opsets it loads; 1.31 loads up to 26
# and refuses 27 (onnx 1.23 defines 28), so a higher opset would write a model no session can open.
MAX_OPSET = 25
MODEL_FILE = "model.onnx"  # the graph inside an exported folder

# metadata_props keys of an exported model (what ``ditq validate`` and ``ditq sample`` read back)
META_RECIPE = "ditq.recipe"
META_SOURCE = "ditq.source"
META_VERSION = "ditq.version"
META_TARGET = "ditq.target"
META_CONFIG = "ditq.model_config"
META_FAMILY = "ditq.family"  # the diffusers class (ditq.families); absent: DiTTransformer2DModel
META_PIPELINE = "ditq.pipeline"  # how to sample: {"space": "pixel"|"latent", "clip_denoised": bool, ...}
META_SESSION_CONFIG = "ditq.session_config"  # JSON object of the session config entries the model needs
# JSON object, layer -> the effective plan its kernel computes (ditq.graphs.plan_record): what validate checks
META_PLANS = "ditq.plans"

# the ONNX Runtime session config entry a ``qdq`` model records (ditq.runtime.session applies it)
ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"
# what a weight DequantizeLinear -> MatMul states: fp32 activations in the fused kernel
EXACT_QDQ_CONFIG = {ACCURACY_LEVEL: "0"}
