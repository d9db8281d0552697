"""The hot-path ops. Each module holds the reference and the backend table (see dispatch.py).

Importing this package registers every backend that can load here: the native ones from
engine._C and the Triton ones from kernels/. Model, data and inference code call these.
"""
from engine.ops.attention import attention
from engine.ops.paged_attention import paged_decode_attention, write_kv
from engine.ops.sampling import cfg_sample
from engine.ops.span_cross_entropy import span_cross_entropy

__all__ = ["attention", "cfg_sample", "paged_decode_attention", "span_cross_entropy", "write_kv"]
