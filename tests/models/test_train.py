"""The training loop on a tiny Gemma: exact resume, accumulation equal to the large batch, gradient
checkpointing, the schedule, checkpoints and logs, and ``gemma-ground finetune`` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_chat import chat_tokenizer, instruction_rows, save_checkpoint, tiny_gemma, write_jsonl

from models import load_model
from models.finetune import lm_batch_loss
from models.instruct import InstructionBatches, encode_chat, row_messages
from models.lora import LoraSettings, add_lora, load_adapter
from models.train import TrainError, TrainSettings, latest_checkpoint, learning_rate_at, train


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    return [encode_chat(tok, row_messages(r)) for r in instruction_rows(12)]


def lora_model(tok, dropout=0.1, arch="gemma3"):
    model = tiny_gemma(tok.vocab_size, arch, seed=2)
    add_lora(model, LoraSettings(r=4, alpha=8, dropout=dropout), seed=0)
    return model


def run(tok, examples, out, settings, *, batch_size=2, dropout=0.1, arch="gemma3", **kwargs):
    model = lora_model(tok, dropout, arch)
    result = train(model, InstructionBatches(examples, batch_size, tok.pad_id), lm_batch_loss, out, settings, **kwargs)
    return model, result


def log_entries(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_run_exactly(tok, examples, tmp_path):
    """Dropout, shuffling, accumulation, warm-up and an epoch boundary inside the run: resuming from the
    step-3 checkpoint in another directory gives bit-identical losses and parameters."""
    settings = TrainSettings(learning_rate=5e-3, warmup_steps=2, grad_accum=2, epochs=2, checkpoint_every=3,
                             keep_checkpoints=3, seed=7)
    model, full = run(tok, examples, tmp_path / "full", settings)
    assert full.steps == 6 and len(full.losses) == 6
    assert [p.split("/")[-1] for p in full.checkpoints] == ["step-000003", "step-000006"]
    assert latest_checkpoint(tmp_path / "full").name == "step-000006"

    resumed_model, resumed = run(tok, examples, tmp_path / "resumed", settings,
                                 resume=tmp_path / "full" / "checkpoints" / "step-000003")
    assert resumed.resumed_from.endswith("step-000003")
    assert resumed.losses == full.losses  # exactly, not approximately
    for (name, p), (_, q) in zip(model.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    entries = log_entries(tmp_path / "resumed")
    assert entries[0] == {"event": "resume", "step": 3, "checkpoint": resumed.resumed_from}
    assert [e["step"] for e in entries if "loss" in e] == [4, 5, 6]

    changed = settings.model_copy(update={"learning_rate": 1e-3})
    with pytest.raises(TrainError, match="learning_rate"):
        run(tok, examples, tmp_path / "other", changed, resume=tmp_path / "full" / "checkpoints" / "step-000003")
    with pytest.raises(TrainError, match="no checkpoint"):
        run(tok, examples, tmp_path / "empty", settings, resume=True)
    with pytest.raises(TrainError, match="earlier run"):  # a fresh start never overwrites checkpoints
        run(tok, examples, tmp_path / "full", settings)


def test_accumulation_equals_the_large_batch(tok, examples, tmp_path):
    """One step of 2 x 2 micro-batches with different token counts against one batch of 4: the same loss and
    the same gradient (its norm is logged before clipping), so the same update."""
    varied = [encode_chat(tok, row_messages({**r, "output": r["output"] * (1 + i % 3)}))
              for i, r in enumerate(instruction_rows(8))]  # answers of 1, 2 or 3 sentences
    first_step = InstructionBatches(varied, 2, tok.pad_id).epoch(0, seed=3)[:2]
    assert [int(b["labels"][:, 1:].ne(-100).sum()) for b in first_step] == [12, 27]  # unequal micro-batches
    settings = dict(learning_rate=1e-2, max_steps=1, max_grad_norm=1e9, seed=3)
    small, accumulated = run(tok, varied, tmp_path / "a", TrainSettings(grad_accum=2, **settings), dropout=0.0)
    large, single = run(tok, varied, tmp_path / "b", TrainSettings(grad_accum=1, **settings), batch_size=4,
                        dropout=0.0)
    assert math.isclose(accumulated.losses[0], single.losses[0], rel_tol=1e-6)
    norms = [log_entries(tmp_path / d)[1]["grad_norm"] for d in ("a", "b")]
    assert norms[0] > 0 and math.isclose(norms[0], norms[1], rel_tol=1e-5)
    for (name, p), (_, q) in zip(small.named_parameters(), large.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_gradient_checkpointing_changes_nothing_but_memory(tok, examples, tmp_path):
    """Dropout masks are replayed in the recomputation: the same losses and parameters (fp32 rounding)."""
    settings = dict(learning_rate=5e-3, max_steps=3, seed=1)
    plain, a = run(tok, examples, tmp_path / "plain", TrainSettings(**settings), arch="gemma2")
    recomputed, b = run(tok, examples, tmp_path / "ckpt", TrainSettings(gradient_checkpointing=True, **settings),
                        arch="gemma2")
    assert all(getattr(layer, "_checkpointed", False) for layer in recomputed.model.layers)
    torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(a.losses), atol=1e-6, rtol=0)
    for (name, p), (_, q) in zip(plain.named_parameters(), recomputed.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)


def test_bf16_autocast_trains_close_to_fp32(tok, examples, tmp_path):
    """The CUDA default (autocast="auto" means bf16 there), run on the CPU: the projections run in bf16, the
    RoPE tables and the residual stream stay fp32; the losses follow fp32's to bf16 precision."""
    settings = dict(learning_rate=5e-3, max_steps=3, seed=1)
    _, fp32 = run(tok, examples, tmp_path / "fp32", TrainSettings(autocast="off", **settings), dropout=0.0)
    _, bf16 = run(tok, examples, tmp_path / "bf16", TrainSettings(autocast="bf16", **settings), dropout=0.0)
    assert fp32.losses != bf16.losses  # bf16 arithmetic did happen
    torch.testing.assert_close(torch.tensor(bf16.losses), torch.tensor(fp32.losses), atol=0.05, rtol=0)


def test_schedule_warm_up_then_cosine():
    s = TrainSettings(learning_rate=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [learning_rate_at(step, s, total_steps=14) for step in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up ends at the peak
    assert math.isclose(lrs[4], 1.0) and math.isclose(lrs[-1], 0.1)  # cosine from the peak to the floor
    assert math.isclose(lrs[9], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_finetune_command_end_to_end(tok, tmp_path):
    """``gemma-ground finetune`` on a checkpoint directory: bad rows reported and skipped, held-out loss
    falls, logs and checkpoints written, and the adapter it saved reproduces the trained model when loaded."""
    from models.cli import main

    model_dir = save_checkpoint(tiny_gemma(tok.vocab_size, "gemma2", seed=3), tok, tmp_path / "model")
    rows = instruction_rows(24) + [{"instruction": "what is red?"}, "{broken", {"instruction": "x", "output": ""}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--eval-fraction", "0.25",
            "--epochs", "3", "--batch-size", "4", "--lr", "1e-2", "--lora-r", "4", "--checkpoint-every", "4",
            "--eval-every", "6", "--json"]
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main(argv) == 0
    result = json.loads(stdout.getvalue())
    assert result["data"]["reasons"] == {"missing output": 1, "invalid JSON": 1, "empty output": 1}
    assert "24 of 27 rows used, 3 skipped" in stderr.getvalue() and "row 26: invalid JSON" in stderr.getvalue()
    assert (result["train_examples"], result["eval_examples"]) == (18, 6)
    training = result["training"]
    assert training["steps"] == 15 and [e[0] for e in training["eval_losses"]] == [0, 6, 12, 15]
    assert training["eval_losses"][-1][1] < training["eval_losses"][0][1] - 0.5  # held-out loss falls
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000012", "step-000015"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    entries = log_entries(out)
    assert entries[0]["event"] == "start" and entries[-1]["event"] == "end"
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(entries[2])

    trained = load_model(model_dir)
    load_adapter(trained, out)
    base = load_model(model_dir)
    ids = torch.tensor([tok.encode("<start_of_turn>user\nwhat is the owl?<end_of_turn>\n<start_of_turn>model\n")])
    with torch.no_grad():
        assert (trained(ids) - base(ids)).abs().max() > 0.1  # the adapter is the trained one, not zeros
    prompt = ids[0].tolist()
    answer = trained.generate([prompt], max_new_tokens=6)[0]
    assert tok.decode(answer).startswith("the answer is")  # it learnt the pattern of the data
