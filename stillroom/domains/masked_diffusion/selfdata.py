"""The self-distillation data: the base model's own answers to the training prompts, decoded with its slow sampler.

Greedy decoding is deterministic, so the answers are a function of the base model and the settings; they are
written once to ``<cache_dir>/masked_diffusion/selfdata/<key>/answers.safetensors`` (the key hashes the base
model's weights, the prompts and the sampler settings; :func:`stillroom.models.cached.build_once` makes the
folder appear whole) with ``selfdata.json`` (how many answers are correct, the steps used).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stillroom.config.masked_diffusion import MaskedDiffusionConfig
from stillroom.domains.masked_diffusion.sampling import decode, slow_rule
from stillroom.domains.masked_diffusion.task import MdSplits, examples
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once, settings_key
from stillroom.train.distributed import Topology

Log = Callable[[str], None]
ANSWERS_FILE = "answers.safetensors"
RECORD_FILE = "selfdata.json"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's weights (names and bytes, in order): what the cached answers depend on."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def self_distilled(sec: MaskedDiffusionConfig, data: MdSplits, base: nn.Module, *, cache_dir: str | None,
                   device: torch.device, topology: Topology, log: Log) -> tuple[MdSplits, dict]:
    """``data`` with the training answers replaced by the base model's slow-sampler answers (cached), and the
    record (token accuracy and exact-match rate of those answers against the correct ones)."""
    task = data.task
    prompts = torch.stack([e.tokens[: task.length] for e in data.train])
    payload = {"weights": weights_digest(base), "prompts": hashlib.sha256(prompts.numpy().tobytes()).hexdigest(),
               "block_size": sec.block_size, "tokens_per_step": sec.distill_tokens_per_step,
               "task": sec.task.model_dump(mode="json")}
    folder = cache_root(cache_dir) / "masked_diffusion" / "selfdata" / settings_key(payload)

    def build(tmp: Path) -> None:
        log(f"self-distillation data: decoding {len(prompts)} training prompts with the base model's slow sampler "
            f"({sec.distill_tokens_per_step} token(s) per step, blocks of {sec.block_size})")
        t0 = time.perf_counter()
        decoded = decode(base, task, prompts, sec.block_size, slow_rule(sec.distill_tokens_per_step),
                         batch_size=sec.eval.batch_size, device=device)
        save_file({"answers": decoded.answers.contiguous()}, str(tmp / ANSWERS_FILE))
        token_acc, exact = task.score(prompts, decoded.answers)
        record = {"token_accuracy": token_acc, "exact_match": exact, "mean_steps": float(decoded.steps.double().mean()),
                  "prompts": len(prompts), "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")

    if not build_once(folder, complete=lambda f: (f / RECORD_FILE).is_file(), topology=topology, build=build):
        log(f"self-distillation data: cached in {folder}")
    answers = load_file(str(folder / ANSWERS_FILE))["answers"]
    record = json.loads((folder / RECORD_FILE).read_text())
    about = [f"training data: the base model's own answers to {len(prompts)} training prompts (slow sampler, "
             f"{sec.distill_tokens_per_step} token(s) per step; token accuracy {record['token_accuracy']:.3f}, exact "
             f"{record['exact_match']:.3f}; cached in {folder})"]
    return MdSplits(task, examples(task, prompts, answers, "train"), data.heldout, [*data.about, *about]), record
