"""How a VLM student starts (``vlm.student``): the teacher's vision tower, frozen, and a vision warm-up stage.

A student built by :func:`~stillroom.domains.vl.vlm_model.vlm_student` is random throughout, its tower too,
and trained on the five-family mix it answers from the wording (colour_of at or below chance), as the teacher
did before its own warm-up. Here, before step 0 and so for the distilled student and the CE baseline alike
(the run's baseline is a copy of the student as this leaves it):

1. ``vision_from_teacher``: the teacher's ``vision_tower`` weights (and ``multi_modal_projector`` when every
   shape matches: the student keeps the teacher's decoder width) are copied in, as LLaVA-MoD's students share
   the teacher's vision encoder;
2. ``freeze_vision``: the tower's parameters get ``requires_grad=False``, so neither optimizer holds them;
3. ``vision_warmup``: a cross-entropy job of the one loop (:func:`stillroom.domains.vl.vlm_teacher.run_stage`)
   on the training records of the chosen families alone (``Example.meta["family"]``), its own lr and cosine
   schedule, batch ``train.micro_batch_size``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from stillroom.data.seeds import derive_seed
from stillroom.domains.vl import vlm_teacher

Log = Callable[[str], None]


def prepare_vlm_student(cfg, student: torch.nn.Module, teacher: torch.nn.Module, tokenizer, train: list,
                        device: torch.device, log: Log) -> torch.nn.Module:
    """``student`` (a LLaVA, dense or upcycled) started as ``cfg.vlm.student`` says (module docstring), in place.

    ``train``: the run's training examples (the warm-up picks its families' ones); ``cfg``: the RunConfig.
    """
    sc = cfg.vlm.student
    if sc.vision_from_teacher:
        parts = copy_vision(student, teacher)
        log(f"student: {' and '.join(parts)} copied from the teacher (vlm.student.vision_from_teacher)")
    if sc.freeze_vision:
        freeze_vision(student)
        log("student: vision tower frozen (vlm.student.freeze_vision)")
    if sc.vision_warmup is not None:
        warm_up(cfg, student, tokenizer, train, device, log)
    return student


def copy_vision(student: torch.nn.Module, teacher: torch.nn.Module) -> list[str]:
    """Copy the teacher's vision tower into ``student`` (shapes must match), and its projector when its shapes
    match too (a student of another decoder width keeps its own random projector). Returns the parts copied."""
    s_inner, t_inner = student.model, teacher.model
    tower_s, tower_t = s_inner.vision_tower.state_dict(), t_inner.vision_tower.state_dict()
    if _shapes(tower_s) != _shapes(tower_t):
        raise ValueError("vlm.student.vision_from_teacher: the student's vision tower differs in shape from the "
                         "teacher's; keep the teacher's vision_config (no student.from_config.vision_config)")
    s_inner.vision_tower.load_state_dict(tower_t)
    parts = ["vision tower"]
    proj_s, proj_t = s_inner.multi_modal_projector.state_dict(), t_inner.multi_modal_projector.state_dict()
    if _shapes(proj_s) == _shapes(proj_t):
        s_inner.multi_modal_projector.load_state_dict(proj_t)
        parts.append("projector")
    return parts


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def freeze_vision(model: torch.nn.Module) -> None:
    """``requires_grad=False`` on the vision tower's parameters (the optimizers take trainable ones only)."""
    model.model.vision_tower.requires_grad_(False)


def warm_up(cfg, student: torch.nn.Module, tokenizer, train: list, device: torch.device, log: Log) -> None:
    """The warm-up stage: CE on the chosen families' training examples, in a scratch folder removed after."""
    wc = cfg.vlm.student.vision_warmup
    chosen = vlm_teacher.warmup_examples(wc, train, where="vlm.student")
    lr = wc.lr if wc.lr is not None else cfg.train.lr
    log(f"student: vision warm-up on {wc.families} alone: {wc.steps} CE steps at lr {lr:g} on {len(chosen)} "
        "sequences" + (" (the CE baseline starts from the warmed-up student too)" if cfg.baseline else ""))
    folder = Path(tempfile.mkdtemp(prefix="vlm_student_warmup_"))
    try:
        vlm_teacher.run_stage(cfg, student, tokenizer, chosen, derive_seed(cfg.seed, "vlm-student-warmup"),
                              folder / "warmup_stage", wc.steps, lr, device, log,
                              batch_size=cfg.train.micro_batch_size, warmup_steps=cfg.train.warmup_steps,
                              player="student")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
