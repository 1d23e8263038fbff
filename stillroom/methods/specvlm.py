"""SpecVLM's online draft distillation (Huang et al. 2025; spec 15): the draft's acceptance as it trains.

The training itself is the loop's: the student is the draft, the teacher the target, and the loss terms say
what is matched (the shipped recipe: 0.1 x soft cross-entropy to the target's distribution + 1.0 x Smooth-L1
between the draft's last hidden state, through a learned projector, and the target's; EAGLE's weights). What
this method adds is the measurement that makes the draft's purpose visible: before the first step and every
``specvlm.eval_every`` steps, lossless speculative decoding (greedy, or sampled at temperature 1:
``specvlm.mode``; :func:`stillroom.generate.speculative.speculative_generate`) of the first ``specvlm.prompts`` held-out prompts,
their images on the first forward of both models, gamma proposals per round. Logged per measurement (into
metrics.jsonl, so a resumed run keeps the earlier points): ``spec_alpha`` (accepted / tested proposals),
``spec_accept_len`` (mean tokens emitted per target forward, the accepted proposals plus the target's own
token: EAGLE's average acceptance length tau, the block efficiency) and ``spec_accepted_per_round`` (tau - 1).
The run folder gets ``specvlm_curve.json`` / ``.png`` and a section of report.md: acceptance length against
training steps.

``specvlm.draft: eagle_head``: the trained draft is EAGLE's feature-level head instead of the student
(:mod:`stillroom.methods.specvlm_eagle`: its player replaces the student's, which is not trained); the curve
measures the head drafting for the target (:class:`~stillroom.generate.eagle_draft.EagleDraft`), and the head is
saved as ``<run>/eagle_head`` (``eagle_head.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from stillroom.data.batch import Batch
from stillroom.generate.sampling import eos_token_ids
from stillroom.generate.speculative import SpecStats, speculative_generate
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.files import write_atomic

CURVE_KEYS = ("spec_alpha", "spec_accept_len", "spec_accepted_per_round")


def acceptance(target: torch.nn.Module, draft: torch.nn.Module, prompts: list, *, gamma: int, max_new_tokens: int,
               eos: list[int], greedy: bool = True) -> dict[str, float]:
    """Speculative decoding of ``prompts`` (``(ids, pixels or None)`` pairs; sampling draws prompt i with seed i):
    the curve's three numbers."""
    total = SpecStats()
    for i, (ids, pixels) in enumerate(prompts):
        total = total + speculative_generate(target, draft, ids, gamma=gamma, max_new_tokens=max_new_tokens,
                                             eos_token_id=eos, pixel_values=pixels, greedy=greedy,
                                             generator=torch.Generator().manual_seed(i)).stats
    return {"spec_alpha": total.acceptance_rate, "spec_accept_len": total.block_efficiency,
            "spec_accepted_per_round": total.accepted / total.target_calls}


class AcceptanceCurve:
    """Measures the draft every ``eval_every`` steps (the step comes from the loop's ``replace_batches`` call)."""

    def __init__(self, ctx: MethodContext, draft: torch.nn.Module | None = None) -> None:
        from stillroom.domains.vl.vlm_eval import prompt_and_pixels

        self.section = ctx.cfg.specvlm
        self.target, self.draft = ctx.teacher_model, ctx.model if draft is None else draft
        if self.target is None:
            raise ValueError("method=specvlm needs the target in process (teacher.source: online)")
        self.prompts = [prompt_and_pixels(ex) for ex in ctx.data.heldout[: self.section.prompts]]
        if not self.prompts:
            raise ValueError("method=specvlm measures acceptance on held-out prompts; raise data.heldout_fraction")
        self.eos = eos_token_ids(ctx.tokenizer, self.target)
        self.step = 0
        self.log = ctx.log
        self.first = self.measure()
        ctx.log(f"specvlm: before training, acceptance length {_num(self.first['spec_accept_len'])} "
                f"(alpha {_num(self.first['spec_alpha'])}, gamma {self.section.gamma})")

    def measure(self) -> dict[str, float]:
        return acceptance(self.target, self.draft, self.prompts, gamma=self.section.gamma,
                          max_new_tokens=self.section.max_new_tokens, eos=self.eos,
                          greedy=self.section.mode == "greedy")

    def note_step(self, micro: list[Batch], step: int) -> list[Batch]:
        self.step = step + 1
        return micro

    def metrics(self) -> dict[str, float]:
        if self.step % self.section.eval_every:
            return {}
        return self.measure()

    def report(self, run_dir: Path) -> None:
        points = [{"step": 0, **self.first}] + read_points(run_dir / "metrics.jsonl")
        write_atomic(run_dir / "specvlm_curve.json", json.dumps({"gamma": self.section.gamma, "points": points},
                                                                indent=2))
        plot_curve(points, run_dir / "specvlm_curve.png", self.section.gamma)
        append_report(run_dir / "report.md", points, self.section.gamma, self.section.draft)


def _num(x) -> str:
    """A curve value to 3 decimals; n/a where none was measured (alpha when no proposal was tested: an EAGLE
    head proposes nothing in the round of the target's first token, so a prompt answered in one token tests none;
    metrics.jsonl stores that NaN as a string)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return f"{x:.3f}" if x == x else "n/a"


def read_points(metrics_file: Path) -> list[dict]:
    """``{step, spec_*}`` of every logged measurement (the last record of a step wins after a resume)."""
    by_step: dict[int, dict] = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            row = json.loads(line)
            if "spec_accept_len" in row:
                by_step[int(row["step"])] = {"step": int(row["step"]), **{k: row[k] for k in CURVE_KEYS}}
    return [by_step[k] for k in sorted(by_step)]


def plot_curve(points: list[dict], path: Path, gamma: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p["step"] for p in points], [p["spec_accept_len"] for p in points], marker="o")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"acceptance length tau (gamma {gamma})")
    ax.set_ylim(1.0, gamma + 1.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def append_report(report: Path, points: list[dict], gamma: int, draft: str = "model") -> None:
    """A section of report.md: the acceptance table against training steps and the curve's picture."""
    if not report.is_file():
        return
    rows = [f"| {p['step']} | {_num(p['spec_accept_len'])} | {_num(p['spec_alpha'])} |" for p in points]
    which = ("The draft is the EAGLE feature-level head saved in `eagle_head/` (the student rows above are the "
             "untrained student, not the draft). ") if draft == "eagle_head" else ""
    section = ["", "## Draft acceptance during training (specvlm)", "",
               f"{which}Speculative decoding with gamma {gamma}; tau = tokens per target forward.", "",
               "| step | acceptance length tau | alpha |", "|---:|---:|---:|", *rows, "",
               "![acceptance length](specvlm_curve.png)", ""]
    write_atomic(report, report.read_text().rstrip("\n") + "\n" + "\n".join(section))


def build(ctx: MethodContext) -> MethodPlan:
    if ctx.cfg.specvlm.draft == "model":
        curve = AcceptanceCurve(ctx)
        return MethodPlan(replace_batches=curve.note_step, metrics=curve.metrics, report=curve.report)
    return eagle_plan(ctx)


def eagle_plan(ctx: MethodContext) -> MethodPlan:
    """``specvlm.draft: eagle_head``: the head is the trained player and the measured draft (module docstring)."""
    from stillroom.generate.eagle_draft import EagleDraft
    from stillroom.generate.eagle_head import build_head, save_head
    from stillroom.methods.specvlm_eagle import eagle_player

    if ctx.teacher_model is None:
        raise ValueError("method=specvlm needs the target in process (teacher.source: online)")
    section = ctx.cfg.specvlm
    head = build_head(ctx.teacher_model, layers=section.head_layers, seed=section.head_seed,
                      name=f"run {ctx.cfg.name}").float()
    n_params = sum(p.numel() for p in head.parameters())
    ctx.log(f"specvlm: EAGLE head draft, {section.head_layers} decoder layer(s), {n_params / 1e6:.2f}M parameters "
            "(the student is not trained)")
    curve = AcceptanceCurve(ctx, EagleDraft(head, ctx.teacher_model))
    player = eagle_player(ctx, head, curve.note_step)

    def report(run_dir: Path) -> None:
        save_head(head, run_dir / "eagle_head")
        curve.report(run_dir)

    return MethodPlan(replace_batches=curve.note_step, metrics=curve.metrics, report=report,
                      players=lambda _student: [player])


METHOD = Method("specvlm", build=build)
