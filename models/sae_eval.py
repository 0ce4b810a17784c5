"""Reading and measuring SAEs on a native model: per-token feature readout, Gemma Scope's metrics and
top-activating tokens.

Metrics (Gemma Scope's, BOS excluded):

- L0: mean number of active latents per token;
- FVU, fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the tokens,
  ``mean(x)`` being the mean activation over the whole set;
- delta LM loss: next-token cross-entropy with the reconstruction spliced in at the site minus the clean
  cross-entropy, over every predicted token. The BOS position keeps its clean activation in the spliced
  run (the SAE never saw BOS activations, which are outliers).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from .hooks import HookError, Site, decoder_of, record, run_to_sites, site_width, splice

__all__ = ["FeatureReadout", "TokenFeatures", "read_features", "SAEMetrics", "evaluate_sae", "TopActivations",
           "FeatureExample", "feature_examples", "check_sae_fits", "token_losses"]

_LOGIT_CHUNK = 128  # positions per LM-head product: the 262144-wide logits of a whole batch would not fit


def check_sae_fits(model, sae, site: Site) -> None:
    """A clear error when the SAE's width or recorded site does not match ``site`` on this model."""
    width = site_width(model, site)
    if sae.d_in != width:
        raise HookError(f"the SAE reads {sae.d_in} features but site {site} of this model is {width} wide")
    if sae.site is not None and sae.site != site:
        raise HookError(f"the SAE was made for site {sae.site}, not {site}")


class Feature(BaseModel):
    index: int
    value: float


class TokenFeatures(BaseModel):
    position: int
    token_id: int
    token: str
    features: list[Feature]  # the top-k active latents, largest first (fewer when fewer are active)


class FeatureReadout(BaseModel):
    """``gemma-ground features --json``: the top-k active features of every token but BOS."""

    site: str
    text: str
    tokens: list[TokenFeatures]


def read_features(model, tokenizer, sae, site: Site, text: str, *, k: int = 5) -> FeatureReadout:
    """For each token of ``text`` (BOS excluded) its ``k`` most active SAE features with their values."""
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    check_sae_fits(model, sae, site)
    ids = tokenizer.encode(text)
    with torch.inference_mode():
        x = run_to_sites(model, torch.tensor([ids], device=model.device), site)[site][0]
        acts = sae.encode(x).float().cpu()
    top = torch.topk(acts, min(k, sae.d_sae), dim=-1)
    tokens = []
    for pos, token_id in enumerate(ids):
        if pos == 0 and token_id == tokenizer.bos_id:
            continue
        feats = [Feature(index=int(i), value=float(v)) for v, i in zip(top.values[pos], top.indices[pos],
                                                                      strict=True) if v > 0]
        tokens.append(TokenFeatures(position=pos, token_id=token_id, token=tokenizer.decode([token_id]),
                                    features=feats))
    return FeatureReadout(site=str(site), text=text, tokens=tokens)


def token_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy ``(batch, seq - 1)`` of ``ids``, the LM head applied a chunk at a time."""
    lm = decoder_of(model)
    hidden = lm.hidden_states(ids)[:, :-1]
    targets = ids[:, 1:]
    out = torch.empty(targets.shape, dtype=torch.float32, device=ids.device)
    for start in range(0, hidden.shape[1], _LOGIT_CHUNK):
        logits = lm.logits(hidden[:, start:start + _LOGIT_CHUNK]).float()
        out[:, start:start + _LOGIT_CHUNK] = F.cross_entropy(
            logits.transpose(1, 2), targets[:, start:start + _LOGIT_CHUNK], reduction="none")
    return out


class TopActivations:
    """The ``k`` largest activations of every latent seen so far, with the token index of each."""

    def __init__(self, d_sae: int, k: int):
        self.k = k
        self.values = torch.zeros(k, d_sae)
        self.indices = torch.full((k, d_sae), -1, dtype=torch.long)

    def update(self, acts: torch.Tensor, first_index: int) -> None:
        """``acts`` ``(tokens, d_sae)`` of tokens numbered ``first_index``, ``first_index + 1``, ..."""
        k = min(self.k, len(acts))
        values, rows = torch.topk(acts.float(), k, dim=0)
        values = torch.cat([self.values, values])
        indices = torch.cat([self.indices, rows + first_index])
        best = torch.topk(values, self.k, dim=0).indices
        self.values, self.indices = values.gather(0, best), indices.gather(0, best)

    def of(self, feature: int) -> list[tuple[float, int]]:
        """``(value, token index)`` pairs of a latent, largest first, active ones only."""
        return [(float(v), int(i)) for v, i in zip(self.values[:, feature], self.indices[:, feature], strict=True)
                if v > 0 and i >= 0]


class FeatureExample(BaseModel):
    feature: int
    value: float
    token: str
    context: str  # the text up to and including the token (a few tokens before it)


class SAEMetrics(BaseModel):
    """Gemma Scope's metrics of one SAE at one site over a set of contexts (BOS excluded)."""

    site: str
    contexts: int
    tokens: int  # activations measured (BOS excluded)
    l0: float
    fvu: float
    clean_loss: float  # mean next-token cross-entropy, nats
    spliced_loss: float
    delta_lm_loss: float
    latents_fired: int  # latents active on at least one token


def evaluate_sae(model, sae, site: Site, batches: Iterable[torch.Tensor], *, bos_id: int,
                 top: TopActivations | None = None) -> SAEMetrics:
    """L0, FVU and delta LM loss over ``batches`` of contexts (``(batch, seq)`` ids starting with BOS).
    ``top``, if given, collects the top activations of every latent (tokens numbered in batch order,
    BOS included in the numbering)."""
    check_sae_fits(model, sae, site)
    d = sae.d_in
    sq_err = torch.zeros((), dtype=torch.float64)
    sum_x = torch.zeros(d, dtype=torch.float64)
    sum_x2 = torch.zeros(d, dtype=torch.float64)
    l0_sum = 0.0
    n_tok = n_ctx = 0
    clean_sum = spliced_sum = 0.0
    n_targets = 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    seen = 0
    with torch.inference_mode():
        for ids in batches:
            ids = ids.to(model.device)
            with record(model, site) as rec:
                clean = token_losses(model, ids)
            with splice(model, site, sae, keep=ids == bos_id):
                spliced = token_losses(model, ids)
            clean_sum += float(clean.double().sum())
            spliced_sum += float(spliced.double().sum())
            n_targets += clean.numel()
            x_all = rec[site]
            acts_all = sae.encode(x_all).float()
            mask = ids != bos_id
            x, acts = x_all[mask].double().cpu(), acts_all[mask].cpu()
            x_hat = sae.decode(acts.to(sae.dtype)).double().cpu()
            sq_err += ((x - x_hat) ** 2).sum()
            sum_x += x.sum(0)
            sum_x2 += (x ** 2).sum(0)
            l0_sum += float((acts > 0).sum())
            fired |= (acts > 0).any(0)
            n_tok += len(x)
            n_ctx += len(ids)
            if top is not None:
                flat = acts_all.reshape(-1, sae.d_sae).cpu() * mask.reshape(-1, 1).cpu()
                top.update(flat, seen)
            seen += ids.numel()
    if n_tok == 0:
        raise ValueError("no tokens to evaluate on (every context was empty or BOS only)")
    variance = (sum_x2 - sum_x ** 2 / n_tok).sum()
    clean_loss, spliced_loss = clean_sum / n_targets, spliced_sum / n_targets
    return SAEMetrics(site=str(site), contexts=n_ctx, tokens=n_tok, l0=l0_sum / n_tok,
                      fvu=float(sq_err / variance.clamp_min(1e-30)), clean_loss=clean_loss,
                      spliced_loss=spliced_loss, delta_lm_loss=spliced_loss - clean_loss,
                      latents_fired=int(fired.sum()))


def feature_examples(top: TopActivations, token_ids: torch.Tensor, tokenizer, features: Iterable[int], *,
                     context_len: int, window: int = 10) -> list[FeatureExample]:
    """Render the top activations of ``features`` as the token and the text before it (up to ``window``
    tokens, never reaching into the previous context). ``token_ids`` holds every evaluated token in the
    numbering :class:`TopActivations` used (the batches' ids flattened, contexts of ``context_len``)."""
    out = []
    for f in features:
        for value, index in top.of(int(f)):
            start = max(index - window, index - index % context_len + 1)  # after the context's BOS
            out.append(FeatureExample(feature=int(f), value=value, token=tokenizer.decode([int(token_ids[index])]),
                                      context=tokenizer.decode(token_ids[start:index + 1].tolist())))
    return out
