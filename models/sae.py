"""JumpReLU sparse autoencoders (Gemma Scope) and their three file formats.

``pre = x @ W_enc + b_enc``; ``acts = (pre > threshold) * relu(pre)`` (strict ``>``, one threshold per
latent); ``x_hat = acts @ W_dec + b_dec``. Gemma Scope's SAEs take raw activations (no ``b_dec``
subtracted from the input, no normalisation); SAELens directories may ask for ``b_dec`` to be
subtracted first (``apply_b_dec_to_input``), which :class:`JumpReLUSAE` honours.

:func:`load_sae` reads

- Gemma Scope (Gemma 2): ``params.npz`` with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``,
  ``b_dec``, ``threshold`` (read with ``allow_pickle=False``);
- Gemma Scope 2 (Gemma 3): ``params.safetensors`` with the same arrays under lower-case keys
  (``w_enc``, ``w_dec``, ...), and the ``config.json`` beside it when there is one;
- SAELens directories: ``cfg.json`` + ``sae_weights.safetensors``.

:meth:`JumpReLUSAE.save` writes a SAELens directory (what ``train-sae`` produces), which SAELens'
``SAE.load_from_disk`` and :func:`load_sae` both read.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .hooks import HookError, Site
from .loading import resolve_dtype

__all__ = ["JumpReLUSAE", "SAEError", "load_sae", "SAELensConfig"]

GEMMA_SCOPE_FILE = "params.npz"
GEMMA_SCOPE_2_FILE = "params.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
# SAELens reads a cfg.json without a version as its pre-6 layout, which takes metadata from top-level
# keys; this names the layout we write (nested metadata), not a SAELens we ran.
SAELENS_CFG_LAYOUT = "6.0.0"
_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


class SAEError(ValueError):
    """An SAE file or directory that cannot be loaded: names the file and what is wrong."""


class JumpReLUSAE(nn.Module):
    """A JumpReLU SAE: :meth:`encode`, :meth:`decode`, ``forward`` (the reconstruction).

    ``site`` is where it reads activations (:class:`~models.hooks.Site`) when its files say so;
    ``metadata`` keeps what the files said about the model and hook.
    """

    def __init__(self, d_in: int, d_sae: int, *, dtype: torch.dtype = torch.float32, device=None,
                 apply_b_dec_to_input: bool = False, site: Site | None = None, metadata: dict | None = None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        self.threshold = nn.Parameter(torch.zeros(d_sae, **kw))
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.site = site
        self.metadata = dict(metadata or {})

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, dtype={self.dtype}, site={self.site}"

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_enc + b_enc`` in the SAE's dtype (``b_dec`` subtracted first if the SAE asks for it)."""
        if x.shape[-1] != self.d_in:
            raise SAEError(f"SAE input must have {self.d_in} features in its last dimension, "
                           f"got shape {tuple(x.shape)}")
        x = x.to(self.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- construction and files ----------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], *, source: str, dtype=None, device="cpu",
                     **kwargs) -> JumpReLUSAE:
        """Build from the five arrays (numpy or torch), checking every key and shape; ``dtype=None``
        keeps the stored dtype."""
        missing = [k for k in _KEYS if k not in tensors]
        if missing:
            raise SAEError(f"{source}: missing array(s) {', '.join(missing)} (has {', '.join(sorted(tensors))})")
        t = {k: torch.as_tensor(tensors[k]) for k in _KEYS}
        if t["W_enc"].dim() != 2:
            raise SAEError(f"{source}: W_enc must be 2-D [d_in, d_sae], got shape {tuple(t['W_enc'].shape)}")
        d_in, d_sae = t["W_enc"].shape
        want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
                "threshold": (d_sae,)}
        bad = [f"{k} {tuple(t[k].shape)} (expected {want[k]})" for k in _KEYS if tuple(t[k].shape) != want[k]]
        if bad:
            raise SAEError(f"{source}: arrays do not fit W_enc [{d_in}, {d_sae}]: {'; '.join(bad)}")
        for k in _KEYS:
            if not t[k].is_floating_point():
                raise SAEError(f"{source}: {k} must hold floating-point values, got {t[k].dtype}")
            if not torch.isfinite(t[k]).all():
                raise SAEError(f"{source}: {k} holds NaN or infinite values")
        dtype = t["W_enc"].dtype if dtype is None else resolve_dtype(dtype, device)
        sae = cls(d_in, d_sae, dtype=dtype, device="meta", **kwargs)
        sae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in t.items()}, assign=True)
        return sae

    def save(self, directory: str | os.PathLike, *, metadata: dict | None = None) -> Path:
        """Write a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``), each file replaced
        atomically so an interrupted save never leaves a half-written file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in self.metadata.items() if k not in ("format", "source")}  # where it was read
        meta.update(metadata or {}, sae_lens_version=SAELENS_CFG_LAYOUT)
        if self.site is not None:
            meta.update(hook_name=self.site.saelens_hook_name, hf_hook_name=self.site.hf_hook_name)
        cfg = SAELensConfig(architecture="jumprelu", d_in=self.d_in, d_sae=self.d_sae,
                            dtype=str(self.dtype).removeprefix("torch."),
                            apply_b_dec_to_input=self.apply_b_dec_to_input, metadata=meta)
        tensors = {k: getattr(self, k).detach().to("cpu").contiguous() for k in _KEYS}
        atomic_write(directory / SAELENS_WEIGHTS, lambda p: save_file(tensors, str(p)))
        atomic_write(directory / SAELENS_CFG,
                      lambda p: p.write_text(cfg.model_dump_json(indent=2), encoding="utf-8"))
        return directory


def atomic_write(path: Path, write) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SAELensConfig(BaseModel):
    """The fields of a SAELens ``cfg.json`` that change what the SAE computes (others are kept)."""

    model_config = ConfigDict(extra="allow")

    architecture: str = "standard"
    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str | bool | None = "none"
    reshape_activations: str = "none"
    finetuning_scaling_factor: bool = False
    metadata: dict[str, Any] = {}


class GemmaScope2Config(BaseModel):
    """Gemma Scope 2's per-SAE ``config.json`` (only what says which site and which kind of SAE)."""

    model_config = ConfigDict(extra="allow")

    architecture: str | None = None
    hf_hook_point_in: str | None = None
    hf_hook_point_out: str | None = None
    model_name: str | None = None


# -- loading --------------------------------------------------------------------------------------
def load_sae(source: str | os.PathLike, *, dtype=None, device="cpu") -> JumpReLUSAE:
    """Load a Gemma Scope ``params.npz``, a Gemma Scope 2 ``params.safetensors`` or a SAELens directory
    (a file, or the directory holding it). ``dtype=None`` keeps the stored dtype (fp32 for Gemma Scope)."""
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        for name in (SAELENS_CFG, GEMMA_SCOPE_2_FILE, GEMMA_SCOPE_FILE):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise SAEError(f"{path}: no SAE here (expected {GEMMA_SCOPE_FILE}, {GEMMA_SCOPE_2_FILE}, or "
                           f"{SAELENS_CFG} + {SAELENS_WEIGHTS})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SAE file or directory")
    if path.name == SAELENS_CFG or path.name == SAELENS_WEIGHTS:
        return _load_saelens(path.parent, dtype, device)
    if path.suffix == ".npz":
        return _load_gemma_scope(path, dtype, device)
    if path.suffix == ".safetensors":
        return _load_gemma_scope_2(path, dtype, device)
    raise SAEError(f"{path}: not an SAE file (expected .npz, .safetensors or {SAELENS_CFG})")


def _load_gemma_scope(path: Path, dtype, device) -> JumpReLUSAE:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except ValueError as e:  # pickled object arrays are refused, never unpickled
        raise SAEError(f"{path}: cannot be read without unpickling ({e})") from None
    except (OSError, EOFError) as e:
        raise SAEError(f"{path}: not a readable .npz file ({e})") from None
    arrays = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in arrays.items()}
    site = _site_from_path(path)
    return JumpReLUSAE.from_tensors(arrays, source=str(path), dtype=dtype, device=device, site=site,
                                    metadata={"format": "gemma-scope", "source": str(path)})


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise SAEError(f"{path}: not a readable safetensors file ({e})") from None


def _read_json(path: Path, model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise SAEError(f"{path}: not valid JSON ({e})") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise SAEError(f"{path}: unexpected contents ({problems})") from None


def _load_gemma_scope_2(path: Path, dtype, device) -> JumpReLUSAE:
    raw = _read_safetensors(path)
    if "affine_skip_connection" in raw:
        raise SAEError(f"{path}: a transcoder (it has an affine skip connection); only SAEs are supported")
    tensors = {("W_" + k[2:] if k in ("w_enc", "w_dec") else k): v for k, v in raw.items()}
    site, meta = _site_from_path(path), {"format": "gemma-scope-2", "source": str(path)}
    config_path = path.parent / "config.json"
    if config_path.is_file():
        cfg = _read_json(config_path, GemmaScope2Config)
        if cfg.architecture not in (None, "jump_relu", "jumprelu"):
            raise SAEError(f"{config_path}: architecture {cfg.architecture!r} is not a JumpReLU SAE")
        if cfg.hf_hook_point_out:
            raise SAEError(f"{config_path}: a transcoder (it writes to {cfg.hf_hook_point_out}); "
                           "only SAEs are supported")
        if cfg.hf_hook_point_in:
            site = _parse_site(cfg.hf_hook_point_in)
            meta["hf_hook_name"] = cfg.hf_hook_point_in
        if cfg.model_name:
            meta["model_name"] = cfg.model_name
    return JumpReLUSAE.from_tensors(tensors, source=str(path), dtype=dtype, device=device, site=site,
                                    metadata=meta)


def _load_saelens(directory: Path, dtype, device) -> JumpReLUSAE:
    cfg_path, weights = directory / SAELENS_CFG, directory / SAELENS_WEIGHTS
    for p in (cfg_path, weights):
        if not p.is_file():
            raise SAEError(f"{directory}: a SAELens directory needs {p.name}")
    cfg: SAELensConfig = _read_json(cfg_path, SAELensConfig)
    if cfg.architecture != "jumprelu":
        raise SAEError(f"{cfg_path}: architecture {cfg.architecture!r} is not a JumpReLU SAE")
    if cfg.normalize_activations not in ("none", None, False):
        raise SAEError(f"{cfg_path}: normalize_activations={cfg.normalize_activations!r} is not supported "
                       "(fold the normalisation into the weights first)")
    if cfg.reshape_activations not in ("none", "hook_z"):  # hook_z: heads flattened, as our att site gives
        raise SAEError(f"{cfg_path}: reshape_activations={cfg.reshape_activations!r} is not supported")
    tensors = _read_safetensors(weights)
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise SAEError(f"{weights}: a fine-tuning scaling factor is not supported")
    meta = {**(cfg.model_extra or {}), **cfg.metadata}
    hook = meta.get("hook_name") or meta.get("hook_point") or meta.get("hf_hook_name")
    site = _parse_site(hook) if hook else None
    if "W_enc" in tensors and tuple(tensors["W_enc"].shape) != (cfg.d_in, cfg.d_sae):
        raise SAEError(f"{cfg_path}: d_in={cfg.d_in}, d_sae={cfg.d_sae} but {weights.name} has W_enc of shape "
                       f"{tuple(tensors['W_enc'].shape)}")
    return JumpReLUSAE.from_tensors(tensors, source=str(weights), dtype=dtype or cfg.dtype, device=device,
                                    apply_b_dec_to_input=cfg.apply_b_dec_to_input, site=site,
                                    metadata={**meta, "format": "saelens", "source": str(directory)})


def _parse_site(name: str) -> Site | None:
    try:
        return Site.parse(name)
    except HookError:
        return None  # a hook this project has no site for (e.g. embeddings): the SAE still loads


def _site_from_path(path: Path) -> Site | None:
    """Gemma Scope's layouts: ``gemma-scope-2b-pt-res/layer_12/width_16k/...`` and Gemma Scope 2's
    ``resid_post/layer_12_width_16k_l0_medium/params.safetensors``."""
    text = path.as_posix()
    layer = re.search(r"layer_(\d+)", text)
    kind = re.search(r"gemma-scope-[^/]*-(res|att|mlp)(?:/|$)", text) or \
        re.search(r"(?:^|/)(resid_post|attn_out|mlp_out)(?:/|$)", text)
    if not (layer and kind):
        return None
    return Site({"resid_post": "res", "attn_out": "att", "mlp_out": "mlp"}.get(kind.group(1), kind.group(1)),
                int(layer.group(1)))
