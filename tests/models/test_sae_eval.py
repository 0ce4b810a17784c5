"""Feature readout, Gemma Scope's metrics and the ``features`` / ``train-sae`` commands, against an
independent computation: transformers' activations and logits on the same tiny weights, SAELens'
``JumpReLUSAE`` for the SAE, and the metrics' formulas written out here.

Tolerances: activations and logits agree to ~1e-6 (test_sae_hooks.py); the metrics are sums over a few
hundred tokens accumulated in float64 on our side, so they are compared within 1e-4 relative.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from test_cli import checkpoint  # noqa: F401  (the tiny checkpoint directory + tokenizer fixture)
from test_gemma import VOCAB, hf_model
from test_sae_hooks import saelens_sae

from models import load_model
from models.cli import main
from models.hooks import HookError, Site
from models.sae import load_sae
from models.sae_eval import TopActivations, evaluate_sae, feature_examples

BOS = 2  # test_gemma's configs


@pytest.fixture(scope="module")
def gemma2_pair(tmp_path_factory):
    ref = hf_model("gemma2", kv_heads=2, seed=31)
    directory = tmp_path_factory.mktemp("eval-gemma2")
    ref.save_pretrained(directory)
    return ref, load_model(directory)


def expected_metrics(ref, theirs, batches, layer):
    """The metrics by their definitions, on transformers' activations with SAELens' SAE."""
    clean_ce, spliced_ce, xs = [], [], []

    def splice_hook(module, args, out):
        return torch.cat([out[:, :1], theirs(out[:, 1:])], dim=1)  # BOS (position 0) stays clean

    with torch.no_grad():
        for ids in batches:
            out = ref(ids, output_hidden_states=True)
            xs.append(out.hidden_states[layer + 1][:, 1:].reshape(-1, 64))
            clean_ce.append(F.cross_entropy(out.logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"))
            handle = ref.model.layers[layer].register_forward_hook(splice_hook)
            try:
                spliced = ref(ids).logits
            finally:
                handle.remove()
            spliced_ce.append(F.cross_entropy(spliced[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"))
        x = torch.cat(xs)
        acts, x_hat = theirs.encode(x), theirs(x)
    clean, spliced = torch.cat(clean_ce).mean().item(), torch.cat(spliced_ce).mean().item()
    return {"l0": (acts > 0).sum(1).float().mean().item(),
            "fvu": (((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item(),
            "clean_loss": clean, "spliced_loss": spliced, "delta_lm_loss": spliced - clean,
            "tokens": len(x), "acts": acts}


def test_metrics_equal_their_definitions_on_transformers(gemma2_pair):
    ref, ours = gemma2_pair
    sae, theirs = saelens_sae(64, seed=5)
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(3, VOCAB, (3, 13), generator=gen) for _ in range(3)]
    for b in batches:
        b[:, 0] = BOS
    expected = expected_metrics(ref, theirs, batches, layer=2)
    top = TopActivations(sae.d_sae, k=3)
    got = evaluate_sae(ours, sae, Site("res", 2), batches, bos_id=BOS, top=top)
    assert got.tokens == expected["tokens"] == 3 * 3 * 12 and got.contexts == 9
    assert 1 < got.l0 < 47 and abs(got.delta_lm_loss) > 0.01  # a real SAE effect (random weights: either sign)
    for key in ("l0", "fvu", "clean_loss", "spliced_loss", "delta_lm_loss"):
        assert getattr(got, key) == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    # the top activations of a latent are its 3 largest values over non-BOS tokens
    acts = expected["acts"]
    feature = int((acts > 0).sum(0).argmax())
    assert [v for v, _ in top.of(feature)] == pytest.approx(torch.topk(acts[:, feature], 3).values.tolist(), rel=1e-5)


def test_sae_of_the_wrong_width_or_site_is_refused(gemma2_pair):
    _, ours = gemma2_pair
    sae, _ = saelens_sae(48, seed=1)
    with pytest.raises(HookError, match="the SAE reads 48 features but site res:1 of this model is 64 wide"):
        evaluate_sae(ours, sae, Site("res", 1), [], bos_id=BOS)
    sae, _ = saelens_sae(64, seed=1)
    sae.site = Site("mlp", 1)
    with pytest.raises(HookError, match="made for site mlp:1, not res:1"):
        evaluate_sae(ours, sae, Site("res", 1), [], bos_id=BOS)


def test_feature_examples_show_the_token_and_its_context():
    class Chars:
        bos_id = 0

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    token_ids = torch.tensor([0, *map(ord, "abcdefg"), 0, *map(ord, "hijklmn")])
    top = TopActivations(d_sae=2, k=2)
    acts = torch.zeros(16, 2)
    acts[11, 1], acts[3, 1] = 5.0, 2.0  # 'j' (second context) and 'c' (first)
    top.update(acts, first_index=0)
    examples = feature_examples(top, token_ids, Chars(), [1, 0], context_len=8, window=4)
    assert [(e.value, e.token, e.context) for e in examples] == [(5.0, "j", "hij"), (2.0, "c", "abc")]


def hf_from_directory(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def test_features_command_lists_the_top_features_of_each_token(checkpoint, tmp_path, capsys):  # noqa: F811
    directory, _, tokenizer = checkpoint
    sae, theirs = saelens_sae(64, seed=13)
    sae.site = Site("res", 0)
    sae.save(tmp_path / "sae")
    text = "the cat sat on the mat"
    argv = ["features", "--model", str(directory), "--sae", str(tmp_path / "sae"), "--site", "res", "--layer", "0",
            "-k", "3", text]
    assert main([*argv, "--json"]) == 0
    readout = json.loads(capsys.readouterr().out)

    ids = tokenizer.encode(text)
    with torch.no_grad():
        x = hf_from_directory(directory)(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        acts = theirs.encode(x)
    assert readout["site"] == "res:0" and [t["token_id"] for t in readout["tokens"]] == ids[1:]
    for t in readout["tokens"]:
        values, indices = torch.topk(acts[t["position"]], 3)
        expected = [(int(i), float(v)) for v, i in zip(values, indices, strict=True) if v > 0]
        got = [(f["index"], f["value"]) for f in t["features"]]
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], abs=1e-5)
    assert any(t["features"] for t in readout["tokens"])

    assert main(argv) == 0  # the plain-text table
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(ids) - 1
    assert main([*argv[:-1], "--layer", "7", text]) == 2
    assert "the model has 2 decoder layers" in capsys.readouterr().err


def test_train_sae_command_writes_an_sae_that_saelens_loads(checkpoint, tmp_path, capsys):  # noqa: F811
    directory, _, _ = checkpoint
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "home", "big", "red", "hat"]
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (9,), generator=gen).tolist()) + "."
             for _ in range(300)]
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "sae"
    argv = ["train-sae", "--model", str(directory), "--site", "mlp", "--layer", "0", "--width", "32",
            "--data", str(data), "--out", str(out), "--context-len", "32", "--batch-size", "128",
            "--buffer-tokens", "1024", "--tokens", "6000", "--lr", "3e-3", "--lr-warmup-steps", "5",
            "--sparsity-warmup-steps", "20"]
    assert main(argv) == 0
    summary = capsys.readouterr()
    assert "trained" in summary.out and "saved to" in summary.out
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == report["tokens"] // 128 + (report["tokens"] % 128 > 0)
    assert 0 < report["final_fvu"] < 1 and report["final_l0"] > 0
    assert not list(out.glob(".activations-*"))  # the buffer file is gone

    ours = load_sae(out)
    assert ours.site == Site("mlp", 0) and ours.d_sae == 32
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(out)
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_mlp_out"
    x = torch.randn(20, 64, generator=gen) * 3
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)

    assert main([*argv[:-2], "--data", str(tmp_path / "missing.txt")]) == 2
    assert "no such text file" in capsys.readouterr().err
