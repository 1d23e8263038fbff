"""The model card (``README.md``) of a saved causal-LM student folder: what a hub upload reads.

YAML front matter the hub accepts (``library_name``, ``tags``, ``pipeline_tag``, ``base_model`` where the
teacher is a hub model), the report's metric table (the rows of report.md, so the card and the report never
disagree), the run's key settings and how it was produced. Written when the report is written (after the
students are saved), so a re-evaluation (`stillroom eval`) refreshes it.
"""

from __future__ import annotations

from itertools import takewhile
from pathlib import Path

import yaml

from stillroom import __version__
from stillroom.eval.report import MODEL_LABELS
from stillroom.files import write_atomic

CARD = "README.md"
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The hub model each ``teacher.model.builtin`` is a conversion of (the card's ``base_model``)."""


def teacher_name(cfg) -> str:
    """The teacher as the recipe names it: the builtin name, the path / hub id, or the GGUF file."""
    src = cfg.teacher.model
    return src.builtin or src.path or src.gguf or "?"


def teacher_hub_id(cfg) -> str | None:
    """The teacher's hub id, where it has one: a builtin's source model, or a ``path`` shaped like a hub id that
    is not a folder here; ``None`` for local folders and GGUF files."""
    from stillroom.models.load import local_reason

    src = cfg.teacher.model
    if src.builtin is not None:
        return BUILTIN_HUB_IDS.get(src.builtin)
    if src.path is not None and not Path(src.path).expanduser().exists() and local_reason(src.path) is None:
        return src.path
    return None


def metrics_table(report_md: str) -> list[str]:
    """The table lines of report.md's ``## Metrics`` section (empty when it has none)."""
    lines = report_md.splitlines()
    if "## Metrics" not in lines:
        return []
    rest = lines[lines.index("## Metrics") + 1:]
    return list(takewhile(lambda line: line.startswith("|"), [line for line in rest if line.strip()]))


def front_matter(cfg, *, baseline: bool = False) -> dict:
    """The card's YAML header (no license: the run cannot know the data's and the teacher's terms)."""
    meta: dict = {"library_name": "transformers", "tags": ["distillation", "stillroom"],
                  "pipeline_tag": "image-text-to-text" if getattr(cfg, "vlm", None) is not None else "text-generation"}
    hub = teacher_hub_id(cfg)
    if hub is not None and not baseline:
        meta["base_model"] = hub
    return meta


def _data_line(source) -> str:
    name = source.path or source.dataset or f"bundled: {source.bundled}"
    return name + (f" (first {source.limit} records)" if source.limit else "")


def model_card(cfg, report_md: str, *, baseline: bool = False) -> str:
    """The card's text for the run ``cfg``'s student (``baseline``: the cross-entropy-only baseline)."""
    from stillroom.methods import METHODS

    ce_only = baseline or METHODS[cfg.method].ce_only  # trained on cross-entropy alone: no loss terms of the teacher
    terms = "ce" if ce_only else ", ".join(f"{t.name} × {t.weight:g}" + (f" {t.params}" if t.params else "")
                                           for t in cfg.loss.terms)
    what = (f"The cross-entropy-only baseline of the stillroom run `{cfg.name}`: the same student trained on the "
            f"same tokens without the teacher, for comparison." if baseline else
            f"A student trained by stillroom (method `{cfg.method}`, cross-entropy only) beside the teacher "
            f"`{teacher_name(cfg)}`." if ce_only else
            f"A student distilled by stillroom (method `{cfg.method}`) from the teacher `{teacher_name(cfg)}`.")
    lines = ["---", yaml.safe_dump(front_matter(cfg, baseline=baseline), sort_keys=False).strip(), "---", "",
             f"# {cfg.name}" + (" (baseline)" if baseline else ""), "", what, "",
             "## Evaluation", "", f"The run's report (report.md); this model is the row "
             f"`{MODEL_LABELS['baseline' if baseline else 'student_after']}`.", ""]
    lines += metrics_table(report_md) or ["(the report holds no metric table)"]
    train = cfg.train
    lines += ["", "## Settings", "",
              f"- recipe: `{cfg.name}` (method `{cfg.method}`, domain `{cfg.domain}`)",
              f"- teacher: `{teacher_name(cfg)}` (source: {cfg.teacher.source}, "
              f"tokenizer: {cfg.teacher.tokenizer_mode})",
              f"- loss terms: {terms}" + ("" if ce_only else f"; loss temperature {cfg.loss.loss_temperature:g}"),
              f"- steps: {train.steps} × {train.micro_batch_size} sequences × {train.grad_accum} accumulation, "
              f"lr {train.lr:g} ({train.schedule})",
              f"- data: {'; '.join(_data_line(s) for s in cfg.data.sources)}; sequence length {cfg.data.seq_len}",
              "", "## How it was produced", "",
              f"`stillroom run RECIPE` (stillroom {__version__}); the run folder's `config.resolved.yaml` holds every "
              "setting; `stillroom run config.resolved.yaml name=NEW` repeats the run in a new folder. "
              "`stillroom eval` re-evaluates it and rewrites this card."]
    return "\n".join(lines) + "\n"


def write_model_cards(cfg, report_md: str, folders: dict[str, Path]) -> list[Path]:
    """Write ``README.md`` into each saved model folder of ``folders`` (``student_after`` / ``baseline`` ->
    folder; a folder without ``config.json`` is skipped); returns the cards written."""
    written = []
    for key, folder in folders.items():
        if (Path(folder) / "config.json").is_file():
            write_atomic(Path(folder) / CARD, model_card(cfg, report_md, baseline=key == "baseline"))
            written.append(Path(folder) / CARD)
    return written
