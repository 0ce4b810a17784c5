"""Shared test set-up. Triton kernels run under its interpreter when no CUDA device is present; the
variable is read when triton is imported, so it is set here, before any test module imports it."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
