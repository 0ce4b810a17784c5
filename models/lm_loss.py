"""The causal language-model loss for training, without materialising the logits.

Gemma's vocabulary is 256-262k tokens: the logits of a 4 x 256-token batch are 1 GiB in fp32, and their
gradient another. :func:`linear_cross_entropy` computes ``cross_entropy(softcap(hidden @ W^T), targets)``
chunk by chunk of rows and, in the same pass, the gradient with respect to ``hidden`` (and ``W`` when it
is trained), so only one chunk of logits exists at a time and the backward is a multiplication.
:func:`causal_lm_loss` applies it to the positions that have a label (the model's turns in instruction
tuning), so prompt tokens cost no LM-head work at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["linear_cross_entropy", "causal_lm_loss", "IGNORE_INDEX", "output_embedding"]

IGNORE_INDEX = -100  # label of positions without a loss (prompt, padding), as in transformers
_CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MiB in fp32)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_rows):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                  device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        rows = torch.arange(min(chunk_rows, hidden.shape[0]), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            t = targets[start:start + chunk_rows]
            n = h.shape[0]
            logits = F.linear(h, weight)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
            if softcap is not None:
                capped = torch.tanh(logits.div_(softcap))  # tanh(z / cap); the logits are cap * that
                slope = 1.0 - capped * capped  # d(cap * tanh(z / cap)) / dz
                logits = capped.mul_(softcap)
            log_probs = torch.log_softmax(logits, dim=-1)  # one fused pass over the chunk
            del logits
            total -= log_probs[rows[:n], t].sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad = log_probs.exp_()  # softmax, in place
            grad[rows[:n], t] -= 1.0
            if softcap is not None:
                grad.mul_(slope)
            if grad_hidden is not None:
                grad_hidden[start:start + n] = grad.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += grad.T.to(h.dtype) @ h
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = list(ctx.saved_tensors)
        grad_hidden = grad_weight = None
        if ctx.has[0]:
            grad = saved.pop(0)
            grad_hidden = grad * grad_total.to(grad.dtype)
        if ctx.has[1]:
            grad_weight = (saved.pop(0) * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         softcap: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """``sum_i cross_entropy(softcap(hidden_i @ weight^T), targets_i)`` (a sum, fp32) for ``hidden``
    ``(n, d)``, ``weight`` ``(vocab, d)`` and ``targets`` ``(n,)`` in ``[0, vocab)``."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (n, d) and weight (vocab, d) expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}); positions without a loss are selected "
                         "out before this call")
    chunk_rows = chunk_rows or max(1, _CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, softcap, chunk_rows)


def output_embedding(model: nn.Module) -> torch.Tensor:
    """The LM head's weight of a :class:`~models.gemma.GemmaLM` (tied to the embeddings unless it has its own)."""
    if getattr(model, "lm_head_quantized", None) is not None:
        raise ValueError("training needs the floating-point LM head; load the model without quantize=")
    return model.lm_head.weight if hasattr(model, "lm_head") else model.model.embed_tokens.weight


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum of next-token losses, number of predicted tokens)``: position ``t`` predicts ``labels[t + 1]``,
    positions whose next label is :data:`IGNORE_INDEX` are skipped (no LM-head work). Rows are
    right-padded; padding carries no label, and causal attention keeps it out of the real tokens."""
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    hidden = model.hidden_states(input_ids)
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    count = int(selected.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][selected]
    loss = linear_cross_entropy(h, output_embedding(model), targets[selected],
                                softcap=model.config.final_logit_softcapping)
    return loss, count
