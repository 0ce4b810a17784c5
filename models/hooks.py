"""Hook points on the native Gemma decoders at Gemma Scope's sites: record activations, edit them, steer.

Sites (:class:`Site`), as Gemma Scope defines them for decoder block ``L``:

- ``res``: the residual stream after block L (the block's output);
- ``att``: the attention output before ``o_proj``, heads concatenated: ``(batch, seq, heads * head_dim)``;
- ``mlp``: the MLP output as it is added to the residual stream: after the post-feedforward norm in
  Gemma 2/3, the MLP's own output in Gemma 1 (which has no such norm).

Every hook is a PyTorch module hook registered by a context manager here and removed when it exits,
so a model with no hook active runs exactly the code it ran before: nothing is checked per layer.

- :func:`record` keeps the activations of every forward pass (prefill and each decode step);
- :func:`edit` replaces an activation by ``fn(activation)``; :func:`splice` puts an SAE's
  reconstruction in its place (optionally leaving some positions, such as BOS, clean);
- :func:`steer` adds ``strength * direction`` at a site (:class:`Steer`; ``generate(..., steer=...)``);
- :func:`run_to_sites` runs a forward only as far as the deepest site it needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Site", "SITE_KINDS", "HookError", "Recording", "Steer", "record", "edit", "splice", "steer",
           "run_to_sites", "site_width", "decoder_of"]

SITE_KINDS = ("res", "att", "mlp")
# Order of the sites inside one block (attention, then MLP, then the block's output).
_ORDER = {"att": 0, "mlp": 1, "res": 2}
_SAELENS_HOOKS = {"res": "blocks.{}.hook_resid_post", "att": "blocks.{}.attn.hook_z", "mlp": "blocks.{}.hook_mlp_out"}
_HF_HOOKS = {"res": "model.layers.{}.output", "att": "model.layers.{}.self_attn.o_proj.input",
             "mlp": "model.layers.{}.post_feedforward_layernorm.output"}
_NAME_PATTERNS = [
    (re.compile(r"blocks\.(\d+)\.hook_resid_post$"), "res"),
    (re.compile(r"blocks\.(\d+)\.attn\.hook_z$"), "att"),
    (re.compile(r"blocks\.(\d+)\.hook_mlp_out$"), "mlp"),
    (re.compile(r"layers\.(\d+)\.output$"), "res"),
    (re.compile(r"layers\.(\d+)\.self_attn\.o_proj\.input$"), "att"),
    (re.compile(r"layers\.(\d+)\.post_feedforward_layernorm\.output$"), "mlp"),
    (re.compile(r"^(res|att|mlp)[:.](\d+)$"), None),
]


class HookError(ValueError):
    """A site the model does not have, or an edit that does not fit the activation it replaces."""


@dataclass(frozen=True)
class Site:
    """One of Gemma Scope's hook sites: ``kind`` in ``res``/``att``/``mlp`` at decoder block ``layer``."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise HookError(f"site kind must be one of {', '.join(SITE_KINDS)}, got {self.kind!r}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise HookError(f"site layer must be an integer >= 0, got {self.layer!r}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.layer}"

    @property
    def saelens_hook_name(self) -> str:
        """The TransformerLens hook name SAELens records (``blocks.L.hook_resid_post`` ...)."""
        return _SAELENS_HOOKS[self.kind].format(self.layer)

    @property
    def hf_hook_name(self) -> str:
        """The transformers module path Gemma Scope 2 names (``model.layers.L.output`` ...)."""
        return _HF_HOOKS[self.kind].format(self.layer)

    @classmethod
    def parse(cls, name: str) -> Site:
        """``res:6``, ``res.6``, a SAELens hook name or a transformers hook point."""
        for pattern, kind in _NAME_PATTERNS:
            m = pattern.search(str(name).strip())
            if m:
                return cls(kind, int(m.group(1))) if kind else cls(m.group(1), int(m.group(2)))
        raise HookError(f"cannot read a site from {name!r}; expected e.g. 'res:6', 'blocks.6.hook_resid_post' "
                        "or 'model.layers.6.output'")

    def _rank(self) -> tuple[int, int]:
        return self.layer, _ORDER[self.kind]


def decoder_of(model: nn.Module) -> nn.Module:
    """The :class:`~models.gemma.GemmaLM` of a model (a PaliGemma's language model, or the model itself)."""
    inner = getattr(model, "language_model", model)
    if not hasattr(inner, "model") or not hasattr(inner.model, "layers"):
        raise HookError(f"{type(model).__name__} is not a native Gemma decoder (no model.layers)")
    return inner


def _target(model: nn.Module, site: Site) -> tuple[nn.Module, bool]:
    """The module to hook and whether the activation is its input (a pre-hook) rather than its output."""
    layers = decoder_of(model).model.layers
    if site.layer >= len(layers):
        raise HookError(f"site {site}: the model has {len(layers)} decoder layers (0..{len(layers) - 1})")
    layer = layers[site.layer]
    if site.kind == "res":
        return layer, False
    if site.kind == "att":
        return layer.self_attn.o_proj, True
    return (layer.post_feedforward_layernorm if layer.sandwich else layer.mlp), False


def site_width(model: nn.Module, site: Site) -> int:
    """Width of the activation at ``site``: hidden size, or heads * head_dim for ``att``."""
    _target(model, site)  # a layer the model does not have is an error here already
    c = decoder_of(model).config
    return c.num_attention_heads * c.head_dim if site.kind == "att" else c.hidden_size


def _attach(model: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register ``fn(activation)``; a tensor it returns replaces the activation. Returns the handle."""
    module, is_input = _target(model, site)
    if is_input:
        def pre_hook(_module, args):
            new = fn(args[0])
            return None if new is None else (new, *args[1:])
        return module.register_forward_pre_hook(pre_hook)

    def post_hook(_module, _args, output):
        return fn(output)
    return module.register_forward_hook(post_hook)


@contextmanager
def _attached(model: nn.Module, hooks: Iterable[tuple[Site, Callable]]) -> Iterator[None]:
    handles = []
    try:
        for site, fn in hooks:
            handles.append(_attach(model, site, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_sites(sites: Site | str | Iterable[Site | str]) -> list[Site]:
    if isinstance(sites, (Site, str)):
        sites = [sites]
    out = [s if isinstance(s, Site) else Site.parse(s) for s in sites]
    if not out:
        raise HookError("no site given")
    return out


class Recording:
    """Activations recorded per site: one tensor per forward pass, in call order."""

    def __init__(self, sites: list[Site]):
        self.calls: dict[Site, list[torch.Tensor]] = {s: [] for s in sites}

    def _key(self, site: Site | str) -> Site:
        key = site if isinstance(site, Site) else Site.parse(site)
        if key not in self.calls:
            raise KeyError(f"site {key} was not recorded (recorded: {', '.join(map(str, self.calls))})")
        return key

    def __getitem__(self, site: Site | str) -> torch.Tensor:
        """All forward passes of ``site`` joined along the sequence (a prefill then its decode steps)."""
        calls = self.calls[self._key(site)]
        if not calls:
            raise KeyError(f"site {site}: no forward pass ran while recording")
        return calls[0] if len(calls) == 1 else torch.cat(calls, dim=1)

    def last(self, site: Site | str) -> torch.Tensor:
        calls = self.calls[self._key(site)]
        if not calls:
            raise KeyError(f"site {site}: no forward pass ran while recording")
        return calls[-1]

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()


@contextmanager
def record(model: nn.Module, sites: Site | str | Iterable[Site | str], *, device=None) -> Iterator[Recording]:
    """Record the activations at ``sites`` of every forward pass run inside the block.

    ``with record(model, "res:3") as rec: model(ids)`` then ``rec["res:3"]`` is ``(batch, seq, width)``.
    Tensors are detached (moved to ``device`` if given).
    """
    sites = _as_sites(sites)
    rec = Recording(sites)

    def keeper(site):
        def keep(x):
            y = x.detach()
            rec.calls[site].append(y if device is None else y.to(device))
        return keep

    with _attached(model, [(s, keeper(s)) for s in sites]):
        yield rec


@contextmanager
def edit(model: nn.Module, site: Site | str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the activation at ``site`` by ``fn(activation)`` (same shape) in every forward pass."""
    (site,) = _as_sites(site)

    def replace(x):
        y = fn(x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise HookError(f"edit at {site} must return a tensor of shape {tuple(x.shape)}, got {got}")
        return y.to(x.dtype)

    with _attached(model, [(site, replace)]):
        yield


@contextmanager
def splice(model: nn.Module, site: Site | str, sae: Callable[[torch.Tensor], torch.Tensor], *,
           keep: torch.Tensor | None = None) -> Iterator[None]:
    """Put ``sae(activation)`` (its reconstruction) in place of the activation at ``site``.

    ``keep``: a boolean ``(batch, seq)`` mask of positions left clean (e.g. ``input_ids == bos``: Gemma
    Scope's SAEs were not trained on BOS, whose activations are outliers).
    """
    def reconstruct(x):
        y = sae(x).to(x.dtype)
        if keep is None:
            return y
        if keep.shape != x.shape[:2]:
            raise HookError(f"splice keep mask of shape {tuple(keep.shape)} does not fit the activation "
                            f"{tuple(x.shape)} at {site}")
        return torch.where(keep.to(x.device)[..., None], x, y)

    with edit(model, site, reconstruct):
        yield


@dataclass
class Steer:
    """Add ``strength * direction`` to the activation at ``site``, at every position of every forward."""

    site: Site
    direction: torch.Tensor
    strength: float = 1.0

    @classmethod
    def from_sae(cls, sae, feature: int, strength: float, site: Site | str | None = None) -> Steer:
        """Steer along decoder row ``feature`` of an SAE (``W_dec[feature]``), at the SAE's site by default."""
        site = Site.parse(site) if isinstance(site, str) else (site or getattr(sae, "site", None))
        if site is None:
            raise HookError("this SAE records no site: pass site=")
        if not 0 <= int(feature) < sae.W_dec.shape[0]:
            raise HookError(f"feature {feature} out of range: the SAE has {sae.W_dec.shape[0]} features")
        return cls(site, sae.W_dec[int(feature)].detach(), float(strength))


@contextmanager
def steer(model: nn.Module, steers: Steer | Iterable[Steer]) -> Iterator[None]:
    """Apply one or more :class:`Steer` edits inside the block (generation included)."""
    steers = [steers] if isinstance(steers, Steer) else list(steers)
    hooks = []
    for s in steers:
        width = site_width(model, s.site)
        if s.direction.shape != (width,):
            raise HookError(f"steering direction at {s.site} must have shape ({width},), "
                            f"got {tuple(s.direction.shape)}")

        def add(x, s=s):
            return x + s.strength * s.direction.to(device=x.device, dtype=x.dtype)
        hooks.append((s.site, add))
    with _attached(model, hooks):
        yield


class _Stop(Exception):
    """Raised by the deepest hook of :func:`run_to_sites` once every activation it needs is kept."""


def run_to_sites(model: nn.Module, input_ids: torch.Tensor, sites: Site | str | Iterable[Site | str],
                 **forward_kwargs) -> dict[Site, torch.Tensor]:
    """Activations at ``sites`` for ``input_ids``, running the model only as far as the deepest site
    (the layers after it and the LM head are skipped)."""
    sites = _as_sites(sites)
    deepest = max(sites, key=Site._rank)
    out: dict[Site, torch.Tensor] = {}

    def keeper(site):
        def keep(x):
            out[site] = x.detach()
            if site == deepest:
                raise _Stop
        return keep

    with _attached(model, [(s, keeper(s)) for s in set(sites)]):
        try:
            decoder_of(model).hidden_states(input_ids, **forward_kwargs)
        except _Stop:
            pass
    missing = [str(s) for s in sites if s not in out]
    if missing:
        raise HookError(f"the forward pass never reached site(s) {', '.join(missing)}")
    return out
