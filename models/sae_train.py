"""Training JumpReLU SAEs by the method of the Gemma Scope paper (Rajamanoharan et al.'s JumpReLU SAEs).

Loss, per token, in normalised units: ``||x - x_hat||^2 + lambda * ||f(x)||_0``. The JumpReLU and the
step function inside the L0 have zero gradient almost everywhere with respect to the threshold, so
both use straight-through estimators with a rectangle kernel ``K(z) = 1{-1/2 < z < 1/2}`` and bandwidth
``eps``:

- JumpReLU ``z * H(z - t)``: ``d/dz = H(z - t)``; ``d/dt = -(t / eps) K((z - t) / eps)``;
- step ``H(z - t)``: ``d/dz = 0``; ``d/dt = -(1 / eps) K((z - t) / eps)``.

So the L0 penalty trains the thresholds only, and the reconstruction trains everything.

The paper's set-up, as defaults of :class:`TrainConfig`: inputs scaled by a fixed scalar to unit mean
squared norm (estimated on the first batch, folded into the saved weights so they take raw
activations); ``W_dec`` He-uniform then rows (decoder directions) at unit norm, ``W_enc = W_dec.T``,
zero biases, thresholds 0.001, bandwidth 0.001; Adam (beta1 0, beta2 0.999, eps 1e-8), learning rate
7e-5 reached by a cosine warm-up from a tenth of it over 1,000 steps; lambda warmed up linearly from 0
over 10,000 steps. Decoder rows stay at unit norm: the gradient component along each row is removed
before the step, and rows are renormalised after it. Thresholds are trained directly (not as
``log t``: Adam moves a parameter by about the learning rate a step, and in log space a threshold
would need far more steps than a CPU run has to leave 0.001) and kept >= 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn

from .hooks import Site, site_width
from .sae import JumpReLUSAE, atomic_write
from .sae_data import ActivationBuffer, context_batches, stream_activations, text_contexts

__all__ = ["TrainConfig", "TrainReport", "TrainLogEntry", "train_sae", "train_sae_on_text", "jumprelu", "step", "init_sae", "learning_rate_factor",
           "sparsity_factor"]


TRAINING_REPORT = "training.json"
DEAD_WINDOW = 1_000_000  # tokens without firing after which a latent counts as dead


def _rectangle(z: torch.Tensor) -> torch.Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z > threshold).to(z.dtype) * grad
        grad_t = -(threshold / eps) * _rectangle((z - threshold) / eps) * grad
        return grad_z, grad_t.sum_to_size(threshold.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = -(1.0 / eps) * _rectangle((z - threshold) / eps) * grad
        return None, grad_t.sum_to_size(threshold.shape), None


def jumprelu(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``z * H(z - threshold)`` with the straight-through estimator for the threshold."""
    return _JumpReLU.apply(z, threshold, bandwidth)


def step(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``H(z - threshold)`` with the straight-through estimator for the threshold (none for ``z``)."""
    return _Step.apply(z, threshold, bandwidth)


@dataclass
class TrainConfig:
    width: int  # number of latents (d_sae)
    l0_coefficient: float = 1e-3  # lambda, in units where inputs have unit mean squared norm
    lr: float = 7e-5  # Adam learning rate after warm-up
    lr_warmup_steps: int = 1000  # cosine warm-up from lr / 10 to lr
    sparsity_warmup_steps: int = 10000  # lambda grows linearly from 0 over these steps
    bandwidth: float = 0.001  # width of the rectangle kernel of the straight-through estimators
    init_threshold: float = 0.001
    adam_betas: tuple[float, float] = (0.0, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 4096  # tokens per step
    max_steps: int | None = None  # stop after this many steps (None: when the stream ends)
    log_every: int = 50  # steps between entries of the report's history
    seed: int = 0

    def validate(self) -> None:
        checks = {"width": self.width >= 1, "l0_coefficient": self.l0_coefficient >= 0, "lr": self.lr > 0,
                  "lr_warmup_steps": self.lr_warmup_steps >= 0, "bandwidth": self.bandwidth > 0,
                  "sparsity_warmup_steps": self.sparsity_warmup_steps >= 0, "batch_size": self.batch_size >= 1,
                  "init_threshold": self.init_threshold >= 0, "log_every": self.log_every >= 1,
                  "max_steps": self.max_steps is None or self.max_steps >= 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("bad training settings: " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))


def learning_rate_factor(step_index: int, warmup_steps: int) -> float:
    """Multiplier of the learning rate: cosine from 0.1 to 1 over the warm-up, then 1."""
    if step_index >= warmup_steps:
        return 1.0
    return 0.1 + 0.9 * 0.5 * (1.0 - math.cos(math.pi * step_index / warmup_steps))


def sparsity_factor(step_index: int, warmup_steps: int) -> float:
    """Multiplier of lambda: linear from 0 to 1 over the warm-up, then 1."""
    return 1.0 if step_index >= warmup_steps else step_index / warmup_steps


def init_sae(d_in: int, config: TrainConfig) -> JumpReLUSAE:
    """The paper's initialisation (see the module docstring), in fp32."""
    gen = torch.Generator().manual_seed(config.seed)
    sae = JumpReLUSAE(d_in, config.width)
    with torch.no_grad():
        w_dec = (torch.rand(config.width, d_in, generator=gen) * 2 - 1) * math.sqrt(6.0 / config.width)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.threshold.fill_(config.init_threshold)
    return sae


class TrainLogEntry(BaseModel):
    step: int
    tokens: int
    l0: float  # mean active latents per token on the step's batch
    fvu: float  # fraction of variance unexplained on the step's batch
    loss: float
    lr: float
    l0_coefficient: float


class TrainReport(BaseModel):
    """What a training run did (``training.json`` beside the saved SAE)."""

    steps: int
    tokens: int
    input_scale: float  # inputs were multiplied by this during training (folded into the weights)
    final_l0: float
    final_fvu: float
    dead_latents: int  # latents that did not fire over the last DEAD_WINDOW tokens (or the whole run)
    config: dict
    history: list[TrainLogEntry]


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(dim=0)) ** 2).sum().clamp_min(1e-30))


@torch.no_grad()  # (with grad mode on, the gradient itself would grow an autograd graph step after step)
def _project_decoder_gradient(w_dec: nn.Parameter) -> None:
    """Remove from each decoder row's gradient its component along the (unit-norm) row."""
    if w_dec.grad is not None:
        w_dec.grad -= (w_dec.grad * w_dec).sum(dim=1, keepdim=True) * w_dec


def train_sae(batches: Iterable[torch.Tensor], d_in: int, config: TrainConfig, *, site: Site | None = None,
              metadata: dict | None = None, progress: Callable[[int, TrainLogEntry], None] | None = None
              ) -> tuple[JumpReLUSAE, TrainReport]:
    """Train a JumpReLU SAE on ``(tokens, d_in)`` activation batches (already shuffled: see
    :class:`~models.sae_data.ActivationBuffer`). Returns the SAE, on raw activations, and a report.
    ``progress(step, entry)`` is called after every step."""
    config.validate()
    torch.manual_seed(config.seed)
    sae = init_sae(d_in, config)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold]
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)
    eps = config.bandwidth
    scale: float | None = None
    history: list[TrainLogEntry] = []
    tokens = steps = 0
    entry: TrainLogEntry | None = None
    last_fired = torch.full((config.width,), -1, dtype=torch.long)  # tokens seen when each latent last fired
    for batch in batches:
        if config.max_steps is not None and steps >= config.max_steps:
            break
        x = torch.as_tensor(batch).float()
        if x.dim() != 2 or x.shape[1] != d_in:
            raise ValueError(f"training batches must be (tokens, {d_in}), got {tuple(x.shape)}")
        if scale is None:
            scale = 1.0 / math.sqrt(float((x ** 2).sum(dim=1).mean().clamp_min(1e-30)))
        x = x * scale
        lr = config.lr * learning_rate_factor(steps, config.lr_warmup_steps)
        lam = config.l0_coefficient * sparsity_factor(steps, config.sparsity_warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        pre = x @ sae.W_enc + sae.b_enc
        acts = jumprelu(pre, sae.threshold, eps)
        x_hat = acts @ sae.W_dec + sae.b_dec
        reconstruction = ((x - x_hat) ** 2).sum(dim=1).mean()
        l0_estimate = step(pre, sae.threshold, eps).sum(dim=1).mean()
        loss = reconstruction + lam * l0_estimate
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _project_decoder_gradient(sae.W_dec)
        optimizer.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sae.threshold.clamp_(min=0.0)

        steps += 1
        tokens += len(x)
        with torch.no_grad():
            active = acts > 0
            last_fired[active.any(dim=0)] = tokens
            entry = TrainLogEntry(step=steps, tokens=tokens, l0=float(active.sum(dim=1).float().mean()),
                                  fvu=_fvu(x, x_hat.detach()), loss=float(loss), lr=lr, l0_coefficient=lam)
        if steps % config.log_every == 0 or steps == 1:
            history.append(entry)
        if progress is not None:
            progress(steps, entry)
    if entry is None:
        raise ValueError("no training batch: the activation stream was empty")
    if history[-1].step != entry.step:
        history.append(entry)

    with torch.no_grad():  # fold the input scale in: f_raw = f / s, so b_enc, threshold and b_dec scale by 1 / s
        sae.b_enc /= scale
        sae.threshold /= scale
        sae.b_dec /= scale
    sae.requires_grad_(False)
    sae.site = site
    sae.metadata = dict(metadata or {})
    dead = int((tokens - last_fired >= min(DEAD_WINDOW, tokens)).sum())
    report = TrainReport(steps=steps, tokens=tokens, input_scale=scale, final_l0=entry.l0, final_fvu=entry.fvu,
                         dead_latents=dead, config=asdict(config), history=history)
    return sae, report


def train_sae_on_text(model, tokenizer, site: Site, data: str | os.PathLike, out_dir: str | os.PathLike,
                      config: TrainConfig, *, context_len: int = 1024, max_tokens: int | None = None,
                      model_batch: int = 4, buffer_rows: int = 1 << 18, buffer_dir: str | os.PathLike | None = None,
                      metadata: dict | None = None,
                      progress: Callable[[int, TrainLogEntry], None] | None = None) -> TrainReport:
    """Train an SAE on ``site`` activations of ``model`` over a UTF-8 text file and save it to ``out_dir``
    (a SAELens directory, plus ``training.json``, the :class:`TrainReport`).

    Activations stream from the model (``model_batch`` contexts of ``context_len`` tokens per forward,
    BOS left out) through an on-disk :class:`~models.sae_data.ActivationBuffer` of ``buffer_rows`` rows
    (in ``buffer_dir``, default ``out_dir``; deleted at the end), so memory holds one batch at a time.
    """
    config.validate()
    width = site_width(model, site)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer_path = Path(buffer_dir or out_dir) / f".activations-{os.getpid()}.f32"
    contexts = text_contexts(tokenizer, data, context_len, max_tokens=max_tokens)
    chunks = stream_activations(model, site, context_batches(contexts, model_batch), bos_id=tokenizer.bos_id)
    meta = {"hook_name": site.saelens_hook_name, "hf_hook_name": site.hf_hook_name, "context_size": context_len,
            "prepend_bos": True, "dataset_path": str(data), **(metadata or {})}
    with ActivationBuffer(buffer_path, buffer_rows, width, seed=config.seed) as buffer:
        sae, report = train_sae(buffer.batches(chunks, config.batch_size), width, config, site=site,
                                metadata=meta, progress=progress)
    sae.save(out_dir)
    atomic_write(out_dir / TRAINING_REPORT, lambda p: p.write_text(report.model_dump_json(indent=2), encoding="utf-8"))
    return report
