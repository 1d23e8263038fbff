"""``stillroom spec-eval`` as a function: load a target and a draft, read prompts, measure, report.

:func:`spec_eval` takes a :class:`~stillroom.config.commands.SpecEvalConfig`; the measuring is
:func:`stillroom.generate.spec_eval.run_spec_eval`. It reports what it does as it goes (loading,
prompts, a heartbeat while it measures) through ``log``, then the results and where the report is.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from stillroom.config.commands import SpecEvalConfig

SPEC_EVAL_RUNS = Path("runs") / "spec-eval"
HEARTBEAT_S = 15.0  # seconds between progress lines while measuring

Log = Callable[[str], None]
say: Log = functools.partial(print, flush=True)


def model_slug(ref: str) -> str:
    """A short folder-safe name of a model reference: the builtin's name, a .gguf file's stem, or the last two
    parts of a folder path (``runs/draft_tvd_pp/student`` -> ``draft_tvd_pp_student``)."""
    if ref.startswith("builtin:"):
        name = ref.split(":", 1)[1]
    else:
        parts = [p for p in Path(ref).expanduser().parts if p not in ("/", ".", "..", "~")]
        if ref.lower().endswith(".gguf"):
            name = Path(ref).stem
        else:
            name = "_".join(parts[-2:]) if parts else ref
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def output_folder(cfg: SpecEvalConfig) -> Path:
    """``cfg.out``, or ``runs/spec-eval/<draft>-vs-<target>``: each pair of models keeps its own report."""
    if cfg.out is not None:
        return Path(cfg.out).expanduser()
    return SPEC_EVAL_RUNS / f"{model_slug(cfg.draft)}-vs-{model_slug(cfg.target)}"


@contextlib.contextmanager
def heartbeat(model: torch.nn.Module, log: Log, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """While inside, log the elapsed time and the model's forward passes so far, at most every ``every_s`` s.

    A forward pre-hook counts the calls (a counter and a clock read: no effect on the timings worth
    measuring); the line is written from the hook, so nothing runs beside the measurement.
    """
    start = last = time.perf_counter()
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls, last
        calls += 1
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            log(f"  measuring: {now - start:.0f} s, {calls:,} target forward passes so far")

    handle = model.register_forward_pre_hook(count)
    try:
        yield
    finally:
        handle.remove()


def _load(role: str, ref: str, dtype: torch.dtype, device: str, log: Log):
    from stillroom.models.load import load_model, model_source

    t0 = time.perf_counter()
    log(f"loading the {role} {ref} ...")
    loaded = load_model(model_source(ref), dtype=dtype)
    loaded.model.to(device)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    log(f"  {role}: {n_params:,} parameters ({loaded.identity}), {time.perf_counter() - t0:.1f} s")
    return loaded


def _load_draft(cfg: SpecEvalConfig, target, dtype: torch.dtype, log: Log):
    """The draft: a model (sharing the target's tokenizer), or an EAGLE head folder (``eagle_head.json``, written
    by ``specvlm.draft=eagle_head``), which drafts from the target's own features and is checked against it."""
    from types import SimpleNamespace

    from stillroom.generate.eagle_head import is_head_folder

    if is_head_folder(Path(cfg.draft).expanduser()):
        from stillroom.generate.eagle_draft import eagle_draft_from

        model = eagle_draft_from(Path(cfg.draft).expanduser(), target.model)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"  draft: EAGLE head {cfg.draft}, {n_params:,} parameters (it borrows the target's LM head and embedding, not counted)")
        return SimpleNamespace(model=model, identity=f"eagle_head:{cfg.draft}")
    draft = _load("draft", cfg.draft, dtype, cfg.device, log)
    if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise ValueError(
            f"target {cfg.target} and draft {cfg.draft} have different tokenizers; "
            "speculative decoding needs a draft that shares the target's vocabulary"
        )
    return draft


def spec_eval(cfg: SpecEvalConfig, *, log: Log = say) -> dict:
    """Measure ``cfg.draft`` as a speculative drafter for ``cfg.target``; write report.json, report.md and
    block_efficiency.png into :func:`output_folder`; return the report (see :func:`run_spec_eval`)."""
    from stillroom.data.prompts import read_prompts
    from stillroom.generate.spec_eval import run_spec_eval
    from stillroom.models.precision import torch_dtype

    t0 = time.perf_counter()
    out = output_folder(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    log(f"spec-eval: draft {cfg.draft} for target {cfg.target} on {cfg.device} ({cfg.dtype}, "
        f"{torch.get_num_threads()} torch threads); report into {out}")
    dtype = torch_dtype(cfg.dtype)
    target = _load("target", cfg.target, dtype, cfg.device, log)
    draft = _load_draft(cfg, target, dtype, log)
    counts: dict = {}
    pixels = None
    if getattr(target.model.config, "vision_config", None) is not None:  # a VLM: VQA records with their images
        from stillroom.domains.vl.vlm_data import image_prompts

        texts, pixels = image_prompts(cfg.data, cfg.prompts, target.model, target.tokenizer, cfg.target)
        log(f"{len(texts)} image prompts from {cfg.data}")
    else:
        prompts = read_prompts(cfg.data, cfg.prompts, seed=cfg.seed, on_bad_record=cfg.on_bad_record, counts=counts)
        texts = [p.prompt for p in prompts]
        skipped = f", {counts['records_bad']} bad record(s) skipped" if counts.get("records_bad") else ""
        log(f"{len(prompts)} prompts from {cfg.data}{skipped}")
    runs = len(cfg.modes) * (1 + len(cfg.gamma))
    log(f"measuring: {'/'.join(cfg.modes)} x (target alone + gamma {' '.join(map(str, cfg.gamma))}) = {runs} runs "
        f"over {len(texts)} prompts, {cfg.max_new_tokens} new tokens each ...")
    with heartbeat(target.model, log):
        report = run_spec_eval(
            target.model,
            draft.model,
            target.tokenizer,
            texts,
            cfg.gamma,
            max_new_tokens=cfg.max_new_tokens,
            modes=cfg.modes,
            sampling_temperature=cfg.sampling_temperature,
            top_p=cfg.top_p,
            seed=cfg.seed,
            out_dir=out,
            stop_at_eos=cfg.stop_at_eos,
            target_ref=cfg.target,
            draft_ref=cfg.draft,
            target_identity=target.identity,
            draft_identity=draft.identity,
            data_source=cfg.data,
            data_seed=cfg.seed,
            records_skipped=counts.get("records_bad", 0),
            pixel_values=pixels,
        )
    for row in report["results"]:
        log(
            f"{row['mode']:>8} gamma={row['gamma']}: alpha={_num(row['acceptance_rate'], 3)} "
            f"tau={_num(row['block_efficiency'], 2)} speed-up={_num(row['speedup'], 2)}x"
        )
    log(f"done in {time.perf_counter() - t0:.0f} s; report: {out / 'report.md'}")
    return report


def _num(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
