"""Instruction tuning with LoRA (GemmAr-style): data file in, PEFT adapter out.

    finetune(model, tokenizer, "instar.parquet", "out/", lora=LoraSettings(r=16), train=TrainSettings(epochs=2))

reads and tokenizes the data (:mod:`models.instruct`, bad rows reported and skipped), holds out an
evaluation share (or reads ``eval_data``), adds LoRA (:mod:`models.lora`), runs :func:`models.train.train`
with the causal LM loss on the model turns (:mod:`models.lm_loss`) and writes into ``out/``:
``adapter_config.json`` + ``adapter_model.safetensors`` (loadable by ``peft`` on transformers' model and by
:func:`models.lora.load_adapter`), ``data_report.json``, ``train_log.jsonl`` and ``checkpoints/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn

from .instruct import DataReport, InstructionBatches, load_instructions, pack_examples, split_examples
from .lm_loss import causal_lm_loss
from .lora import LoraSettings, add_lora, save_adapter
from .tokenizer import GemmaTokenizer
from .train import TrainResult, TrainSettings, train

__all__ = ["finetune", "FinetuneResult", "lm_batch_loss"]


class FinetuneResult(BaseModel):
    out_dir: str
    data: DataReport
    eval_data: DataReport | None = None
    train_examples: int
    eval_examples: int
    lora_modules: int
    trainable_parameters: int
    training: TrainResult


def lm_batch_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loop's loss function: summed next-token loss over a micro-batch's labelled positions."""
    device = model.device
    return causal_lm_loss(model, batch["input_ids"].to(device), batch["labels"].to(device))[0]


def finetune(model: nn.Module, tokenizer: GemmaTokenizer, data: str | os.PathLike, out_dir: str | os.PathLike, *,
             lora: LoraSettings | None = None, train_settings: TrainSettings | None = None, max_len: int | None = None,
             batch_size: int = 4, pack: bool = False, eval_data: str | os.PathLike | None = None,
             eval_fraction: float = 0.0, base_model: str | None = None, resume: bool = False) -> FinetuneResult:
    """LoRA instruction tuning of a Gemma decoder (see the module docstring). ``max_len`` (default: 512 or the
    model's context if shorter) bounds an example in tokens; longer rows are skipped and reported.
    ``base_model`` is recorded in the adapter config (``base_model_name_or_path``)."""
    settings = train_settings or TrainSettings()
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 512
    max_len = max_len or min(512, context)
    if max_len > context:
        raise ValueError(f"max_len {max_len} exceeds the model's context of {context} tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples, report = load_instructions(data, tokenizer, max_len)
    eval_report = None
    if eval_data is not None:
        held_out, eval_report = load_instructions(eval_data, tokenizer, max_len)
    else:
        examples, held_out = split_examples(examples, eval_fraction, seed=settings.seed)
    train_examples = len(examples)
    if pack:
        examples = pack_examples(examples, max_len)
    (out / "data_report.json").write_text(report.model_dump_json(indent=1), encoding="utf-8")
    names = add_lora(model, lora or LoraSettings(), seed=settings.seed)
    pad_id = tokenizer.pad_id
    batches = InstructionBatches(examples, batch_size, pad_id)
    eval_batches = InstructionBatches(held_out, batch_size, pad_id, shuffle=False).epoch(0, 0) if held_out else None

    def export(m: nn.Module, directory: Path) -> None:
        save_adapter(m, directory, base_model=base_model, task_type="CAUSAL_LM")

    result = train(model, batches, lm_batch_loss, out, settings, eval_data=eval_batches, export=export,
                   resume=resume)
    return FinetuneResult(out_dir=str(out), data=report, eval_data=eval_report, train_examples=train_examples,
                          eval_examples=len(held_out), lora_modules=len(names),
                          trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                          training=result)
