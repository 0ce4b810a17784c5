"""Triton kernels, each beside the plain-torch reference that specifies it.

The entry points live in their modules: ``from gemma_kernels.attention import attention`` and
``from gemma_kernels.maxsim import maxsim`` (the package does not re-export them, so ``gemma_kernels.attention``
and ``gemma_kernels.maxsim`` stay the modules).
"""

from .attention import AttentionArgumentError, attention_reference, attention_triton
from .decode import decode_attention, decode_attention_reference, decode_attention_triton
from .maxsim import MaxSimArgumentError, maxsim_reference, maxsim_triton

__all__ = [
    "AttentionArgumentError", "attention_reference", "attention_triton",
    "decode_attention", "decode_attention_reference", "decode_attention_triton",
    "MaxSimArgumentError", "maxsim_reference", "maxsim_triton",
]
