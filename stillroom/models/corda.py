"""CorDA adapter initialisation (Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation"; spec 14f)
through peft's own implementation (``peft.tuners.lora.corda.preprocess_corda`` + ``init_lora_weights="corda"``).

For every adapted linear W [out, in], peft collects the input covariance C [in, in] over the calibration
sequences (one forward pass each, inputs scaled by 1 / max X, averaged over the passes), damps it
(C~ = C + d mean(diag C) I, d doubled from 0.01 until C~ C~^-1 is within 0.05 of I), takes W C~ = U S V^T and
V^ = C~^-1 V, so W = U S V^T C~^-1 exactly. The adapter takes r components: the *smallest* in the
knowledge-preserving mode (``corda_kpm``: C from the knowledge to keep, whose dominant directions stay frozen
in the residual) or the *largest* in the instruction-previewed mode (``corda_ipm``: C from the task data).
peft sets B A (times alpha / r) = U_r S_r V^_r^T and the frozen residual W - B A (alpha / r), so the wrapped
model computes exactly what the plain one did at step 0. Training and saving (``merge_lora``) are LoRA's.
Nothing here rewrites peft; this module chooses the data, runs the forward passes and builds the configs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stillroom.config.schema import LoraConfig, RunConfig

Log = Callable[[str], None]
MODES = {"corda_kpm": "kpm", "corda_ipm": "ipm"}


def corda_calibration(cfg: RunConfig, tokenizer) -> list[torch.Tensor]:
    """``student.lora.corda.samples`` sequences of ``seq_len`` tokens ([1, seq_len] LongTensors, CPU) packed from
    ``student.lora.corda.sources`` (null: ``data.sources``, without the records the run holds out for
    evaluation). Raises a ``DataError`` naming the sources and the keys to change when they are too small."""
    from stillroom.compress.calibration import calibration_batches
    from stillroom.data.errors import DataError

    corda = cfg.student.lora.corda
    sources = corda.sources if corda.sources is not None else cfg.data.sources
    try:
        return calibration_batches(tokenizer, sources, seq_len=corda.seq_len, batches=corda.samples, batch_size=1,
                                   seed=corda.seed, exclude_heldout_fraction=cfg.data.heldout_fraction)
    except DataError as e:
        raise DataError(f"student.lora.corda: {e} (for CorDA: lower student.lora.corda.samples or seq_len, or set "
                        "student.lora.corda.sources)") from e


def peft_corda_config(cfg: LoraConfig, model: nn.Module):
    """The peft ``LoraConfig`` of a CorDA init (``init_lora_weights="corda"`` with a ``CordaConfig``); raises
    ``ValueError`` naming the available linear layers when none of ``cfg.target_modules`` exists."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora.config import CordaConfig

    if cfg.init not in MODES:
        raise ValueError(f"student.lora.init={cfg.init!r} is not a CorDA mode ({sorted(MODES)})")
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    targets = [t for t in cfg.target_modules if t in names]
    if not targets:
        raise ValueError(f"student.lora.target_modules={cfg.target_modules} matches no linear layer of "
                         f"{type(model).__name__}; available: {sorted(names)}")
    if "lm_head" in targets:
        raise ValueError("student.lora.target_modules includes lm_head: CorDA rewrites the base weight into a "
                         "residual, which would also change tied input embeddings; remove it")
    corda = CordaConfig(corda_method=MODES[cfg.init], use_float16_for_covariance=cfg.corda.float16_covariance,
                        verbose=False)
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          task_type="CAUSAL_LM", bias="none", init_lora_weights="corda", corda_config=corda)


def apply_corda(model: nn.Module, lora_cfg: LoraConfig, calibration_batches: list[torch.Tensor], log: Log = print,
                *, device: torch.device | str | None = None) -> nn.Module:
    """Wrap ``model`` with CorDA-initialised LoRA adapters (peft): only the adapters stay trainable.

    ``calibration_batches``: LongTensors [B, T] of input ids; every row is one forward pass (peft's covariance
    hook treats a call's input as one sample, [T, in]). The passes and the decomposition run on ``device``
    (default: the model's), where the returned model stays.
    """
    from peft import get_peft_model
    from peft.tuners.lora.corda import preprocess_corda

    if not calibration_batches:
        raise ValueError("CorDA needs calibration sequences (student.lora.corda.samples >= 1)")
    if device is not None:
        model = model.to(device)
    peft_cfg = peft_corda_config(lora_cfg, model)
    rows = [row[None] for batch_bt in calibration_batches for row in batch_bt]
    was_training = model.training
    run_dev = next(model.parameters()).device

    def run_model() -> None:
        for ids_1t in rows:
            model(input_ids=ids_1t.to(run_dev))

    mode = MODES[lora_cfg.init]
    log(f"CorDA ({mode}): input covariance of {len(peft_cfg.target_modules)} module kinds over {len(rows)} "
        f"sequences x {rows[0].shape[1]} tokens; the adapters take the r={lora_cfg.r} "
        f"{'smallest' if mode == 'kpm' else 'largest'} components of W C")
    preprocess_corda(model, peft_cfg, run_model=run_model)
    wrapped = get_peft_model(model, peft_cfg)
    wrapped.train(was_training)
    return wrapped
