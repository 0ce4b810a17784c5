"""Compile the kernels ahead of time for a CUDA architecture, without a GPU (run as a script, with
TRITON_INTERPRET unset): catches code that the interpreter accepts but Triton's compiler rejects,
and reports each kernel's shared memory. Prints one JSON line per compiled kernel."""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import gemma_kernels.attention as attention  # noqa: E402
import gemma_kernels.decode as decode  # noqa: E402
import gemma_kernels.maxsim as maxsim  # noqa: E402
import gemma_kernels.rglru as rglru  # noqa: E402

INT_ARGS = {"q_len", "kv_len_total", "q_heads", "kv_heads", "group", "window", "num_splits", "chunk", "rows",
            "q_tokens", "q_offset_all", "kv_lens_all", "prefix_all", "seq_len", "width"}
# these cases also compile the forward that stores the log-sum-exp and the two backward kernels
TRAINING_CASES = (0, 3, 4)


def compile_kernel(fn, arch: int, pointers: dict, constants: dict, options: dict) -> int:
    """Compile ``fn`` for ``sm_<arch>``; return its shared memory in bytes."""
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        elif name.startswith("stride") or name in INT_ARGS:
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).metadata.shared


def attention_variants(arch: int, dtype: str, head_dim: int, causal: bool, window: bool, softcap: bool,
                       prefix: bool, per_row: bool, training: bool = False):
    block_d = max(16, triton.next_power_of_2(head_dim))
    flags = dict(CAUSAL=causal, HAS_WINDOW=window, HAS_SOFTCAP=softcap, HAS_PREFIX=prefix, FP32=dtype == "fp32",
                 ROWS_Q_OFFSET=per_row, ROWS_KV_LENS=per_row, ROWS_PREFIX=per_row)
    # per-row values arrive as int64 tensors (the models' positions); otherwise the pointer is unused
    rows = dict.fromkeys(("Q_OFFSET", "KV_LENS", "PREFIX"), "*i64" if per_row else "*" + dtype)
    config = attention._prefill_config(block_d, True, fp32=dtype == "fp32")
    tiles = {key: config.pop(key) for key in ("BLOCK_M", "BLOCK_N")}
    tensors = dict(Q="*" + dtype, K="*" + dtype, V="*" + dtype)
    yield "prefill", compile_kernel(
        attention._prefill_kernel, arch, dict(**tensors, OUT="*" + dtype, LSE="*fp32", **rows),
        dict(HEAD_DIM=head_dim, BLOCK_D=block_d, **tiles, **flags, STORE_LSE=training), config)
    if training:
        config = attention._backward_config(block_d, True, fp32=dtype == "fp32")
        tiles = {key: config.pop(key) for key in ("BLOCK_M", "BLOCK_N")}
        grads = dict(DO="*" + dtype, LSE="*fp32", DELTA="*fp32", DK="*" + dtype, DV="*" + dtype, DQ="*" + dtype)
        for name, kernel in (("backward_dkdv", attention._prefill_bwd_dkdv_kernel),
                             ("backward_dq", attention._prefill_bwd_dq_kernel)):
            yield name, compile_kernel(kernel, arch, dict(**tensors, **grads, **rows),
                                       dict(HEAD_DIM=head_dim, BLOCK_D=block_d, **tiles, **flags), config)
    yield "decode", compile_kernel(
        decode._decode_split_kernel, arch,
        dict(Q="*" + dtype, K="*" + dtype, V="*" + dtype, PART_O="*fp32", PART_M="*fp32", PART_L="*fp32", **rows),
        dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=16, BLOCK_N=64 if head_dim <= 128 else 32, **flags),
        dict(num_warps=4, num_stages=2))
    yield "decode_merge", compile_kernel(
        decode._decode_merge_kernel, arch, dict(PART_O="*fp32", PART_M="*fp32", PART_L="*fp32", OUT="*" + dtype),
        dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=16), dict(num_warps=4))


def maxsim_variant(arch: int, dtype: str, dim: int, block_r: int, warps: int):
    block_d = max(16, triton.next_power_of_2(dim))
    return compile_kernel(
        maxsim._maxsim_kernel, arch,
        dict(QUERIES="*" + dtype, DOCS="*" + dtype, DOC_LENS="*i32", TOKEN_MAX="*fp32"),
        dict(DIM=dim, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_L=64 if block_d <= 128 else 32, FP32=dtype == "fp32"),
        dict(num_warps=warps, num_stages=3))


def rglru_variant(arch: int, dtype: str):
    config = rglru._scan_config(on_gpu=True)
    tiles = {key: config.pop(key) for key in ("BLOCK_T", "BLOCK_D")}
    return compile_kernel(
        rglru._rglru_scan_kernel, arch,
        dict(A="*" + dtype, X="*" + dtype, RESET="*i8", Y="*" + dtype, H="*fp32"),
        dict(HAS_RESET=True, **tiles), config)


def main(arch: int) -> None:
    cases = [("bf16", 256, True, True, True, False, False),  # Gemma 2 local layer
             ("bf16", 256, True, True, True, False, True),  # ... decoding rows at their own positions
             ("fp16", 72, False, False, False, False, False),  # SigLIP
             ("fp16", 128, True, True, False, True, True),  # PaliGemma 2 prefix-LM with a window
             ("fp32", 64, True, False, True, False, False)]
    for i, case in enumerate(cases):
        for kernel, shared in attention_variants(arch, *case, training=i in TRAINING_CASES):
            print(json.dumps(dict(kernel=kernel, case=list(case), shared=shared)), flush=True)
    for dtype in ("bf16", "fp32"):
        print(json.dumps(dict(kernel="maxsim", case=[dtype, 128], shared=maxsim_variant(arch, dtype, 128, 128, 8))),
              flush=True)
        print(json.dumps(dict(kernel="rglru_scan", case=[dtype], shared=rglru_variant(arch, dtype))), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
