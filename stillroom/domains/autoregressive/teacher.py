"""The autoregressive teacher: a tiny Hugging Face ``LlamaForCausalLM`` over the codebook's token ids.

Its vocabulary is the ``V`` codebook ids plus one BOS/condition token (id ``V``) that every sequence starts
with; only the ``V`` codebook logits are read. Without ``autoregressive.teacher.path`` it is built from the
section's sizes and trained here once through the one loop (:class:`TeacherCE`: cross-entropy on the training
sequences), saved with ``save_pretrained`` (safetensors) into ``<cache_dir>/autoregressive_teachers/<key>/``
(the key hashes the settings, the data and the seed; :func:`stillroom.models.cached.build_once` makes the
folder appear whole), so ``AutoModelForCausalLM.from_pretrained`` loads it without stillroom.

With ``n = 4`` positions its joint over all ``V^4`` sequences is enumerable (:func:`teacher_joint`: one batch).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from stillroom.config.autoregressive import ArTeacherConfig
from stillroom.config.core import TrainConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.autoregressive.data import ArSplits, SeqBatch, collate_sequences
from stillroom.domains.autoregressive.toy import all_sequences
from stillroom.losses import LossResult
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once, settings_key
from stillroom.train.distributed import Topology
from stillroom.train.loop import Player, TrainJob, train_apart

Log = Callable[[str], None]
RECIPE_VERSION = 1
TEACHER_RECORD = "teacher.json"


def build_llama(tc: ArTeacherConfig, vocab: int, seed: int, extra_ids: int = 1, positions: int = 16) -> nn.Module:
    """A fresh ``LlamaForCausalLM`` with ``vocab + extra_ids`` ids (id ``vocab`` is BOS; markov_modes: the
    conditions and the null condition), weights from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab + extra_ids, hidden_size=tc.hidden_size,
                         intermediate_size=tc.intermediate_size, num_hidden_layers=tc.layers,
                         num_attention_heads=tc.heads, num_key_value_heads=tc.heads,
                         max_position_embeddings=max(16, positions), bos_token_id=vocab, eos_token_id=vocab, pad_token_id=None,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def codebook_logits(model: nn.Module, tokens_bn: torch.Tensor, vocab: int,
                    cond_b: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, n, V]`` next-token logits over the codebook ids: position ``i`` reads ``BOS, tokens[:, :i]``
    (markov_modes: the condition id ``vocab + cond`` in place of BOS)."""
    if cond_b is None:
        bos_b1 = torch.full((tokens_bn.shape[0], 1), vocab, dtype=torch.long, device=tokens_bn.device)
    else:
        bos_b1 = (cond_b.to(tokens_bn.device) + vocab)[:, None]
    inputs = torch.cat([bos_b1, tokens_bn[:, :-1]], dim=1)
    return model(input_ids=inputs).logits[..., :vocab].float()


@torch.no_grad()
def next_token_probs(model: nn.Module, tokens_bn: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, n, V]`` the teacher's ``p(. | tokens_<i)`` at every position (one forward, no grad)."""
    return torch.softmax(codebook_logits(model, tokens_bn, vocab), dim=-1)


@torch.no_grad()
def teacher_joint(model: nn.Module, vocab: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[V] * length`` float64: the teacher's exact probability of every sequence (sums to 1)."""
    seqs_sn = all_sequences(vocab, length).to(device)
    logp_snv = torch.log_softmax(codebook_logits(model, seqs_sn, vocab).double(), dim=-1)
    logp_s = logp_snv.gather(-1, seqs_sn[..., None]).squeeze(-1).sum(-1)
    return logp_s.exp().reshape([vocab] * length).cpu()


class TeacherForward(nn.Module):
    """``batch -> {"logits": [B, n, V]}`` of the codebook ids (what distributed data parallel would wrap)."""

    def __init__(self, model: nn.Module, vocab: int):
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, batch: SeqBatch) -> dict[str, torch.Tensor]:
        return {"logits": codebook_logits(self.model, batch.tokens, self.vocab, batch.cond)}


class TeacherCE:
    """Cross-entropy of the next token, summed over positions (``count = B * n``)."""

    def __init__(self, forward: TeacherForward):
        self.forward, self.state = forward, nn.Module()

    def signal(self, batch: Any) -> None:
        return None

    def loss(self, outputs: dict, batch: SeqBatch, signal: Any) -> LossResult:
        logits_bnv = outputs["logits"]
        total = nn.functional.cross_entropy(logits_bnv.flatten(0, 1), batch.tokens.flatten(), reduction="sum")
        return LossResult(total=total, count=batch.num_targets, parts={"ce": float(total.detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


def load_teacher(folder: Path, vocab: int, where: str, extra_ids: int = 1) -> nn.Module:
    """A ``LlamaForCausalLM`` folder with ``vocab + extra_ids`` ids, in eval mode without gradients."""
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise ValueError(f"{where}: {folder} has no config.json; give a folder written by save_pretrained "
                         "(or leave autoregressive.teacher.path null to train one here)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if model.config.vocab_size != vocab + extra_ids:
        what = "the codebook" if extra_ids == 1 else "the markov_modes data"
        raise ValueError(f"{where}: the model in {folder} has vocab_size {model.config.vocab_size}; {what} needs "
                         f"{vocab + extra_ids} ({vocab} token ids + {extra_ids} BOS/condition ids)")
    return model.eval().requires_grad_(False)


def ar_teacher(tc: ArTeacherConfig, data: ArSplits, *, seed: int, cache_dir: str | None, device: torch.device,
               topology: Topology, log: Log) -> tuple[nn.Module, str]:
    """``(teacher on device, where it comes from)`` (see the module docstring)."""
    vocab, extra = data.toy.vocab, data.toy.extra_ids
    if tc.path is not None:
        return (load_teacher(Path(tc.path), vocab, "autoregressive.teacher.path", extra).to(device),
                f"loaded from {tc.path}")
    teacher_seed = tc.seed if tc.seed is not None else seed
    settings = tc.model_dump(mode="json", exclude={"path", "seed"})
    payload = {"version": RECIPE_VERSION, "settings": settings, "seed": teacher_seed, "data": data.fingerprint()}
    key = settings_key(payload)
    folder = cache_root(cache_dir) / "autoregressive_teachers" / key
    if not build_once(folder, complete=lambda f: (f / TEACHER_RECORD).is_file(), topology=topology,
                      build=lambda tmp: _train_teacher(tc, data, teacher_seed, tmp, device, log)):
        log(f"teacher: cached LlamaForCausalLM {folder}")
    record = json.loads((folder / TEACHER_RECORD).read_text())
    origin = (f"LlamaForCausalLM ({tc.layers} layers, hidden {tc.hidden_size}) trained here for {tc.steps} steps "
              f"(seed {teacher_seed}, final loss {record['final_train_loss']:.4f}), cached in {folder}")
    return load_teacher(folder, vocab, "cached autoregressive teacher", extra).to(device), origin


def _train_teacher(tc: ArTeacherConfig, data: ArSplits, seed: int, tmp: Path, device: torch.device, log: Log) -> None:
    vocab = data.toy.vocab
    model = build_llama(tc, vocab, derive_seed(seed, "autoregressive-teacher"), data.toy.extra_ids,
                        data.toy.length + 1)
    log(f"teacher: training a LlamaForCausalLM for {tc.steps} steps")
    player = Player("teacher", model, TeacherCE(TeacherForward(model, vocab)))
    train_cfg = TrainConfig(steps=tc.steps, micro_batch_size=tc.batch_size, lr=tc.lr, weight_decay=0.0,
                            warmup_steps=min(tc.warmup_steps, tc.steps - 1), schedule="cosine", precision="fp32",
                            device=str(device), keep_checkpoints=1, log_every=max(1, tc.steps // 5))
    job = TrainJob(train=train_cfg, seed=seed, run_dir=tmp / "run", run_name="ar-teacher", players=[player],
                   examples=data.train, collate=collate_sequences, topology=Topology(), device=device,
                   sampler=ExampleSampler, log=log, unit="tok")
    t0 = time.perf_counter()
    result = train_apart(job)
    shutil.rmtree(tmp / "run", ignore_errors=True)
    model.cpu().save_pretrained(tmp, safe_serialization=True)
    record = {"settings": tc.model_dump(mode="json"), "seed": seed, "train_sequences": len(data.train),
              "final_train_loss": result.final_loss, "train_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / TEACHER_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log(f"teacher: trained in {record['train_seconds']} s, final loss {result.final_loss:.4f}")
