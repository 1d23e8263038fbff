"""EAGLE's feature-level draft head (Li et al. 2024, "EAGLE"; the draft of SpecVLM, Huang et al. 2025).

The head does not predict tokens from tokens: it predicts the target's next **feature** (the last hidden state,
after the final norm: what the target's LM head reads) from the current one and the embedding of the next token::

    x_t    = fc([e_{t+1} ; f_t])                  fc: Linear(2D -> D, bias), e = the target's input embedding
    f^_{t+1} = DecoderLayer(x_t)                  one (or ``layers``) decoder layer of the target's own class
    logits(x_{t+2}) = lm_head_target(f^_{t+1})    the target's frozen head turns features into tokens

so position ``t`` of the head sees ``f_0..f_t`` and ``x_1..x_{t+1}`` and predicts ``f_{t+1}`` (the feature whose
logits give token ``t + 2``). The decoder layer is built from the target's text config (same width, heads and
rotary settings), so the head reads the target's features in the target's own geometry; as in EAGLE's code, the
first layer has no input norm (the fc output is already a mixture of normalised features and embeddings).

The head owns only ``fc`` and its decoder layer(s); the embedding and the LM head stay the target's (not saved
with the head). A head folder holds ``eagle_head.json`` (this module's config: widths, the target's text config,
the layer classes) and ``model.safetensors``; :func:`load_head` refuses a target whose hidden size or vocabulary
differs. Shapes: ``B`` batch, ``T`` positions, ``D`` the target's hidden size, ``V`` its logits width.
"""

from __future__ import annotations

import copy
import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stillroom.files import write_folder_atomic

CONFIG_FILE = "eagle_head.json"
WEIGHTS_FILE = "model.safetensors"


class HeadMismatch(ValueError):
    """A head folder and a target that do not belong together (hidden size or vocabulary differ)."""


def text_body(target: torch.nn.Module) -> torch.nn.Module:
    """The target's decoder stack (the module with ``embed_tokens``, ``layers`` and ``rotary_emb``): a causal LM's
    ``model``, a LLaVA's ``model.language_model``. Raises a named error for a target without one."""
    for module in target.modules():
        if all(hasattr(module, a) for a in ("embed_tokens", "layers", "rotary_emb")):
            return module
    raise TypeError(f"{type(target).__name__} has no decoder stack with embed_tokens, layers and rotary_emb "
                    "(Llama-family text models and LLaVA); an EAGLE head cannot copy its layer class")


def target_width(target: torch.nn.Module) -> tuple[int, int]:
    """``(hidden size D, logits width V)`` of a target (its text config's hidden size, its LM head's rows)."""
    from stillroom.generate.speculative import logits_width

    return int(target.config.get_text_config().hidden_size), logits_width(target)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(qualname: str) -> type:
    """A class named ``module.Class``; only transformers' classes are imported from a head folder."""
    if not qualname.startswith("transformers."):
        raise ValueError(f"{CONFIG_FILE}: layer class {qualname!r} is not a transformers class; the folder was not "
                         "written by stillroom (rebuild the head with specvlm.draft=eagle_head)")
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class EagleHeadConfig:
    """What rebuilds a head without its target: widths, the target's text config and the layer classes."""

    hidden_size: int
    vocab_size: int
    """The target's logits width V (its LM head rows), checked against the target the head drafts for."""
    layers: int
    text_config: dict
    """The target's text config as a dict (``num_hidden_layers`` set to ``layers``)."""
    layer_class: str
    rotary_class: str
    target: str | None = None
    """A name of the target the head was trained against (informational)."""


class EagleHead(torch.nn.Module):
    """``fc`` + decoder layer(s); :meth:`forward` maps features and next-token embeddings to predicted features."""

    def __init__(self, config: EagleHeadConfig):
        super().__init__()
        self.config = config
        text_cls = _import(config.text_config["_config_class"])
        fields = {k: v for k, v in config.text_config.items() if k != "_config_class"}
        self.text_config = text_cls(**fields)
        self.text_config._attn_implementation = "sdpa"  # an explicit mask is always passed (see _mask)
        layer_cls, rotary_cls = _import(config.layer_class), _import(config.rotary_class)
        d = config.hidden_size
        self.fc = torch.nn.Linear(2 * d, d, bias=True)
        self.layers = torch.nn.ModuleList([layer_cls(self.text_config, layer_idx=i) for i in range(config.layers)])
        self.layers[0].input_layernorm = torch.nn.Identity()  # EAGLE: the first layer reads fc's output unnormed
        self.rotary = rotary_cls(config=self.text_config)

    def new_cache(self) -> Any:
        """An empty KV cache for :meth:`forward` (one entry per head layer)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.text_config)

    def forward(self, features_btd: torch.Tensor, embeds_btd: torch.Tensor, *, cache: Any = None,
                start: int = 0) -> torch.Tensor:
        """Predicted features ``[B, T, D]``: row t from ``features_btd[:, t]`` (f at position ``start + t``) and
        ``embeds_btd[:, t]`` (the embedding of the token at position ``start + t + 1``), attending causally to the
        rows before it and to the ``start`` positions already in ``cache`` (drafting; training passes none)."""
        b, t, _ = features_btd.shape
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([embeds_btd.to(dtype), features_btd.to(dtype)], dim=-1))
        positions = torch.arange(start, start + t, device=x.device)[None].expand(b, t)
        rope = self.rotary(x, position_ids=positions)
        mask = _mask(t, start, x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=positions, cache=cache, use_cache=cache is not None,
                      position_embeddings=rope)
        return x


def _mask(t: int, past: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask ``[1, 1, t, past + t]``: query row i (position ``past + i``) sees keys ``0..past + i``.

    Always explicit: SDPA's ``is_causal`` aligns the triangle top-left, wrong when a cached prefix makes the key
    axis longer than the query axis; a float mask reads the same under eager and SDPA attention."""
    q = torch.arange(past, past + t, device=device)[:, None]
    k = torch.arange(past + t, device=device)[None, :]
    return torch.zeros(t, past + t, dtype=dtype, device=device).masked_fill(k > q, torch.finfo(dtype).min)[None, None]


def build_head(target: torch.nn.Module, *, layers: int = 1, seed: int = 0, name: str | None = None) -> EagleHead:
    """A randomly initialised head for ``target`` (seeded; the global random state is left as it was)."""
    if layers < 1:
        raise ValueError(f"an EAGLE head needs at least one decoder layer (got layers={layers})")
    body = text_body(target)
    d, v = target_width(target)
    text = copy.deepcopy(target.config.get_text_config())
    text.num_hidden_layers = layers
    text_dict = json.loads(json.dumps({**text.to_dict(), "_config_class": _qualname(type(text))}))  # as saved
    text_dict.pop("transformers_version", None)
    cfg = EagleHeadConfig(hidden_size=d, vocab_size=v, layers=layers, text_config=text_dict,
                          layer_class=_qualname(type(body.layers[0])), rotary_class=_qualname(type(body.rotary_emb)),
                          target=name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = EagleHead(cfg)
    dtype = next(target.parameters()).dtype
    return head.to(dtype)


def check_head(head: EagleHead, target: torch.nn.Module, where: str = "the EAGLE head") -> None:
    """Refuse a target the head was not built for: another hidden size or logits width (vocabulary)."""
    d, v = target_width(target)
    if head.config.hidden_size != d:
        raise HeadMismatch(f"{where} reads features of width {head.config.hidden_size} but the target's hidden size "
                           f"is {d}; train a head for this target (specvlm.draft=eagle_head)")
    if head.config.vocab_size != v:
        raise HeadMismatch(f"{where} was trained for a vocabulary of {head.config.vocab_size} logits but the target "
                           f"has {v}; draft and target must share the tokenizer and vocabulary")


def save_head(head: EagleHead, folder: Path) -> None:
    """``eagle_head.json`` + ``model.safetensors`` into ``folder``, renamed into place (atomic)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps({"kind": "eagle_head", **asdict(head.config)}, indent=2))
        save_file(state, str(tmp / WEIGHTS_FILE))

    write_folder_atomic(Path(folder), write)


def is_head_folder(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def load_head(folder: Path, target: torch.nn.Module | None = None) -> EagleHead:
    """The head saved in ``folder``; with ``target``, checked against it (:func:`check_head`)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_head_folder(folder):
        raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE}: not an EAGLE head folder (a run with "
                                "specvlm.draft=eagle_head writes one as <run>/eagle_head)")
    raw = json.loads((folder / CONFIG_FILE).read_text())
    raw.pop("kind", None)
    head = EagleHead(EagleHeadConfig(**raw))
    state = load_file(str(folder / WEIGHTS_FILE))
    head.load_state_dict(state)
    head = head.to(next(iter(state.values())).dtype).eval()
    if target is not None:
        check_head(head, target, where=f"the head in {folder}")
    return head
