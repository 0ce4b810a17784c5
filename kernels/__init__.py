"""Triton kernels, each beside the plain-torch reference that specifies it."""

from .attention import AttentionArgumentError, attention, attention_reference, attention_triton
from .decode import decode_attention, decode_attention_reference, decode_attention_triton
from .maxsim import MaxSimArgumentError, maxsim, maxsim_reference, maxsim_triton

__all__ = [
    "AttentionArgumentError", "attention", "attention_reference", "attention_triton",
    "decode_attention", "decode_attention_reference", "decode_attention_triton",
    "MaxSimArgumentError", "maxsim", "maxsim_reference", "maxsim_triton",
]
