"""The training loop: AdamW on a model's trainable parameters (LoRA factors, fully trained modules).

- Schedule: linear warm-up over ``warmup_steps`` (step ``s`` gets ``lr * (s + 1) / warmup``), then cosine
  decay to ``min_lr_ratio * lr`` at the last step.
- Gradient accumulation over ``grad_accum`` micro-batches, normalised by the *total* weight of the group
  (label tokens for a language model): the update equals the one of the large batch.
- Clipping of the global gradient norm; bf16 autocast on CUDA (``autocast="auto"``); optional gradient
  checkpointing of every decoder layer (activations recomputed in the backward, dropout masks included).
- Checkpoints every ``checkpoint_every`` steps under ``out/checkpoints/step-NNNNNN/``: the trainable
  parameters, AdamW's state and the RNG states in safetensors, the position in the data and the history
  in JSON (nothing pickled), plus whatever ``export`` writes (the PEFT adapter). A checkpoint is written
  under a temporary name and renamed when complete. ``resume=True`` continues from the latest one and
  reproduces the uninterrupted run's losses exactly (same seed and settings).
- A progress bar (tqdm, on a terminal) and one JSON object per line in ``out/train_log.jsonl``:
  ``{"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}`` per logged step,
  ``{"step", "eval_loss"}`` per evaluation.

Data is anything with the :class:`Batches` protocol: micro-batches of an epoch in a deterministic order
for ``(epoch, seed)``, a weight per micro-batch and a token count. ``loss_fn(model, batch)`` returns the
micro-batch's loss *summed* over its weight units (a language model: the sum of token losses, weight =
label tokens; a mean loss with weight 1 works too).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

__all__ = ["TrainSettings", "TrainResult", "TrainError", "Batches", "train", "learning_rate_at",
           "enable_gradient_checkpointing", "latest_checkpoint", "evaluate"]

LOG_FILE = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
_STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


class TrainError(ValueError):
    """Settings, data or a checkpoint that the loop cannot use; the message says which and why."""


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # the cosine ends at this fraction of learning_rate
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; when set, the data repeat as needed (epochs ignored)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    autocast: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(0, ge=0)  # optimizer steps; 0: only after the last step
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0)  # optimizer steps; 0: before the first and after the last step only
    log_every: int = Field(1, ge=1)
    seed: int = 0
    progress: bool | None = None  # None: a bar on a terminal only


# Settings that change the numbers; a checkpoint resumes only under the same values.
_NUMERIC_SETTINGS = ("learning_rate", "weight_decay", "adam_betas", "adam_eps", "warmup_steps", "min_lr_ratio",
                     "epochs", "max_steps", "grad_accum", "max_grad_norm", "autocast", "seed")


class TrainResult(BaseModel):
    steps: int
    losses: list[float]  # one per optimizer step, from the first
    eval_losses: list[tuple[int, float]] = []  # (step, loss); step 0 = before training
    tokens: int
    elapsed_s: float
    tokens_per_s: float
    checkpoints: list[str] = []
    resumed_from: str | None = None


class Batches(Protocol):
    """Micro-batches for the loop (see the module docstring)."""

    def __len__(self) -> int: ...
    def epoch(self, index: int, seed: int) -> Sequence[Any]: ...
    def weight(self, batch: Any) -> float: ...
    def tokens(self, batch: Any) -> int: ...


class _TrainerState(BaseModel):
    """``trainer_state.json`` of a checkpoint."""

    step: int
    micro_batches: int  # consumed so far, over all epochs
    total_steps: int
    settings: TrainSettings
    parameters: list[str]  # the trainable parameters, in optimizer order
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    tokens: int
    elapsed_s: float


def learning_rate_at(step: int, settings: TrainSettings, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``."""
    lr, warmup = settings.learning_rate, settings.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr * (settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine)


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each decoder layer's activations in the backward instead of storing them. Returns the
    number of layers wrapped. Non-reentrant checkpointing restores the RNG state, so dropout masks of
    the recomputation equal the forward's and gradients are unchanged."""
    from torch.utils.checkpoint import checkpoint

    from .gemma import DecoderLayer

    count = 0
    for module in model.modules():
        if isinstance(module, DecoderLayer) and not getattr(module, "_checkpointed", False):
            inner = module.forward

            def forward(*args, _inner=inner, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                return _inner(*args, **kwargs)

            module.forward = forward
            module._checkpointed = True
            count += 1
    if not count:
        raise TrainError(f"{type(model).__name__} has no decoder layers to checkpoint")
    return count


def _autocast(settings: TrainSettings, device: torch.device):
    use = settings.autocast == "bf16" or (settings.autocast == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use else nullcontext()


def evaluate(model: nn.Module, batches: Sequence[Any], data: Batches, loss_fn: Callable, *,
             autocast=nullcontext) -> float:
    """Weighted mean loss over ``batches`` (eval mode, no gradients; the training mode is restored)."""
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0.0
    try:
        with torch.no_grad():
            for batch in batches:
                with autocast():
                    total += float(loss_fn(model, batch))
                weight += data.weight(batch)
    finally:
        model.train(was_training)
    if weight <= 0:
        raise TrainError("the evaluation data have no weight (no label tokens)")
    return total / weight


# -- checkpoints -----------------------------------------------------------------------------------------------
def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint of the highest step under ``out_dir/checkpoints``, if any."""
    root = Path(out_dir) / CHECKPOINTS
    found = [(int(m[1]), p) for p in root.glob("step-*") if (m := _CHECKPOINT_NAME.match(p.name))
             and (p / _STATE_FILE).is_file()]
    return max(found)[1] if found else None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda.{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    out = {}
    for index, values in state.items():
        for key, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{names[index]}:{key}"] = tensor.detach().cpu().contiguous()
    return out


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], names: list[str],
                    source: Path) -> None:
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, field = key.rpartition(":")
        if name not in index:
            raise TrainError(f"{source}: optimizer state for {name}, which is not a trainable parameter")
        state.setdefault(index[name], {})[field] = tensor
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _write_checkpoint(directory: Path, model: nn.Module, params: dict[str, nn.Parameter],
                      optimizer: torch.optim.Optimizer, state: _TrainerState, export: Callable | None) -> Path:
    from safetensors.torch import save_file

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    names = list(params)
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
    save_file(_optimizer_tensors(optimizer, names), str(tmp / "optimizer.safetensors"))
    save_file(_rng_state(), str(tmp / "rng.safetensors"))
    if export is not None:
        export(model, tmp)
    (tmp / _STATE_FILE).write_text(state.model_dump_json(indent=1), encoding="utf-8")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def _read_checkpoint(directory: Path, params: dict[str, nn.Parameter], optimizer, settings: TrainSettings,
                     total_steps: int) -> _TrainerState:
    from safetensors.torch import load_file

    try:
        state = _TrainerState.model_validate_json((directory / _STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainError(f"{directory}: unreadable checkpoint ({e})") from None
    changed = [f for f in _NUMERIC_SETTINGS if getattr(state.settings, f) != getattr(settings, f)]
    if changed:
        raise TrainError(f"{directory}: the checkpoint was written with other settings ({', '.join(changed)}); "
                         "resume with the same settings, or start a new run in another directory")
    if state.parameters != list(params):
        raise TrainError(f"{directory}: the checkpoint's trainable parameters differ from the model's "
                         "(another model, LoRA targets or rank?)")
    if state.total_steps != total_steps:
        raise TrainError(f"{directory}: the checkpoint's run has {state.total_steps} steps, this one "
                         f"{total_steps} (different data?)")
    try:
        trainable = load_file(str(directory / "trainable.safetensors"))
        optimizer_state = load_file(str(directory / "optimizer.safetensors"))
        rng = load_file(str(directory / "rng.safetensors"))
    except (OSError, ValueError, RuntimeError) as e:
        raise TrainError(f"{directory}: unreadable checkpoint tensors ({e})") from None
    with torch.no_grad():
        for name, p in params.items():
            if name not in trainable or trainable[name].shape != p.shape:
                raise TrainError(f"{directory}: no saved value of the right shape for {name}")
            p.copy_(trainable[name])
    _load_optimizer(optimizer, optimizer_state, list(params), directory)
    _set_rng_state(rng)
    return state


def _prune_checkpoints(out_dir: Path, keep: int) -> None:
    root = out_dir / CHECKPOINTS
    found = sorted((int(m[1]), p) for p in root.glob("step-*") if (m := _CHECKPOINT_NAME.match(p.name)))
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# -- the loop ----------------------------------------------------------------------------------------------------
class _Log:
    def __init__(self, path: Path):
        self.path = path

    def write(self, **entry) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _micro_batches(data: Batches, settings: TrainSettings, start: int):
    """``(global index, batch)`` from micro-batch ``start`` on, epoch after epoch."""
    per_epoch = len(data)
    epoch = start // per_epoch
    while settings.max_steps is not None or epoch < settings.epochs:
        batches = data.epoch(epoch, settings.seed)
        for offset in range(start - epoch * per_epoch, per_epoch):
            yield epoch * per_epoch + offset, batches[offset]
        epoch += 1
        start = epoch * per_epoch


def train(model: nn.Module, data: Batches, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
          out_dir: str | os.PathLike, settings: TrainSettings | None = None, *,
          eval_data: Sequence[Any] | None = None, export: Callable[[nn.Module, Path], Any] | None = None,
          resume: bool | str | os.PathLike = False) -> TrainResult:
    """Train ``model``'s trainable parameters (see the module docstring); ``export(model, directory)`` writes
    the user-facing artefacts into each checkpoint and, at the end, into ``out_dir``."""
    settings = settings or TrainSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise TrainError("the model has no trainable parameters (add LoRA with models.lora.add_lora first)")
    if len(data) == 0:
        raise TrainError("no training batches")
    total_steps = settings.max_steps or math.ceil(settings.epochs * len(data) / settings.grad_accum)
    device = next(iter(params.values())).device
    optimizer = torch.optim.AdamW(list(params.values()), lr=settings.learning_rate, betas=settings.adam_betas,
                                  eps=settings.adam_eps, weight_decay=settings.weight_decay)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    autocast = lambda: _autocast(settings, device)  # noqa: E731
    log = _Log(out_dir / LOG_FILE)

    step, consumed, tokens, elapsed = 0, 0, 0, 0.0
    losses: list[float] = []
    eval_losses: list[tuple[int, float]] = []
    resumed_from = None
    if resume:
        checkpoint = latest_checkpoint(out_dir) if resume is True else Path(resume)
        if checkpoint is None:
            raise TrainError(f"{out_dir}: no checkpoint to resume from (train without resume first)")
        state = _read_checkpoint(checkpoint, params, optimizer, settings, total_steps)
        step, consumed, tokens, elapsed = state.step, state.micro_batches, state.tokens, state.elapsed_s
        losses, eval_losses = list(state.losses), [tuple(e) for e in state.eval_losses]
        resumed_from = str(checkpoint)
        log.write(event="resume", step=step, checkpoint=resumed_from)
    else:
        if latest_checkpoint(out_dir) is not None:  # never overwrite the checkpoints of another run
            raise TrainError(f"{out_dir} holds checkpoints of an earlier run; resume it (resume=True, --resume) "
                             "or train into another directory")
        torch.manual_seed(settings.seed)  # dropout masks: the same run for the same seed
        log.path.unlink(missing_ok=True)
        log.write(event="start", total_steps=total_steps, micro_batches_per_epoch=len(data),
                  trainable_parameters=sum(p.numel() for p in params.values()), settings=settings.model_dump())
        if eval_data:
            eval_losses.append((0, evaluate(model, eval_data, data, loss_fn, autocast=autocast)))
            log.write(step=0, eval_loss=eval_losses[-1][1])

    def state_now() -> _TrainerState:
        return _TrainerState(step=step, micro_batches=consumed, total_steps=total_steps, settings=settings,
                             parameters=list(params), losses=losses, eval_losses=eval_losses, tokens=tokens,
                             elapsed_s=elapsed)

    from tqdm import tqdm

    checkpoints: list[str] = []
    model.train()
    stream = _micro_batches(data, settings, consumed)
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", file=sys.stderr,
               disable=None if settings.progress is None else not settings.progress)
    with bar:
        while step < total_steps:
            started = time.perf_counter()
            group = []
            for _ in range(settings.grad_accum):
                item = next(stream, None)
                if item is None:
                    break
                group.append(item[1])
            if not group:
                break
            total_weight = sum(data.weight(b) for b in group)
            if total_weight <= 0:
                raise TrainError(f"step {step + 1}: the micro-batches have no weight (no label tokens)")
            lr = learning_rate_at(step, settings, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_loss = 0.0
            for batch in group:
                with autocast():
                    loss = loss_fn(model, batch) / total_weight
                loss.backward()
                step_loss += float(loss.detach())
            if not math.isfinite(step_loss):
                raise TrainError(f"step {step + 1}: the loss is {step_loss}; lower the learning rate or check the data")
            grad_norm = None
            if settings.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), settings.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            consumed += len(group)
            step_tokens = sum(data.tokens(b) for b in group)
            tokens += step_tokens
            seconds = time.perf_counter() - started
            elapsed += seconds
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if step % settings.log_every == 0 or step == total_steps:
                log.write(step=step, epoch=round(consumed / len(data), 4), loss=step_loss, lr=lr, grad_norm=grad_norm,
                          tokens=step_tokens, tokens_per_s=step_tokens / seconds if seconds else None,
                          elapsed_s=round(elapsed, 3))
            if eval_data and ((settings.eval_every and step % settings.eval_every == 0) or step == total_steps):
                eval_losses.append((step, evaluate(model, eval_data, data, loss_fn, autocast=autocast)))
                log.write(step=step, eval_loss=eval_losses[-1][1])
            if (settings.checkpoint_every and step % settings.checkpoint_every == 0) or step == total_steps:
                path = _write_checkpoint(out_dir / CHECKPOINTS / f"step-{step:06d}", model, params, optimizer,
                                         state_now(), export)
                checkpoints.append(str(path))
                _prune_checkpoints(out_dir, settings.keep_checkpoints)
    model.eval()
    if export is not None:
        export(model, out_dir)
    log.write(event="end", step=step, tokens=tokens, elapsed_s=round(elapsed, 3))
    return TrainResult(steps=step, losses=losses, eval_losses=eval_losses, tokens=tokens, elapsed_s=elapsed,
                       tokens_per_s=tokens / elapsed if elapsed else 0.0,
                       checkpoints=[c for c in checkpoints if Path(c).exists()], resumed_from=resumed_from)
