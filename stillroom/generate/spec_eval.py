"""Measure how well a draft serves a target in speculative decoding; write a report.

For each decoding mode (greedy, sampling) and each draft length gamma this records the
acceptance rate alpha (accepted / tested), DistillSpec's beta estimate of alpha, the
measured block efficiency tau (tokens per target call), the i.i.d. estimate
E[tau] = (1 - alpha^(gamma+1)) / (1 - alpha) from the measured alpha, the memory-bound
speed-up, and the measured wall-clock speed-up over the target decoding alone.

Speed-up is a throughput ratio (tokens/s of speculative decoding over tokens/s of the
target's own KV-cached decoding) on the same prompts. With ``stop_at_eos=False`` (the
default) every run emits exactly ``max_new_tokens`` tokens, so it is also the ratio of
wall times for the same number of tokens.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stillroom.data.prompts import prompt_ids
from stillroom.generate.sampling import eos_token_ids
from stillroom.generate.speculative import (
    SpecStats,
    autoregressive_generate,
    expected_block_efficiency,
    logits_width,
    mbsu,
    speculative_generate,
)

MODES = ("greedy", "sampling")


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _atomic_write(path: Path, write: Any, binary: bool = False) -> None:
    """Write through a temporary file in the same folder, then rename (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _is_ids(prompt: Any) -> bool:
    """A prompt given as token ids (a list of ints), not text or chat messages."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def _run_all(fn: Any, prompts_ids: list[list[int]], seed: int, pixels: Sequence[torch.Tensor | None] | None = None,
             **kw: Any) -> tuple[SpecStats, list[list[int]]]:
    total, outputs = SpecStats(), []
    for i, ids in enumerate(prompts_ids):
        gen = torch.Generator().manual_seed(seed + i)  # prompt i uses the same seed in every run
        image = {} if pixels is None or pixels[i] is None else {"pixel_values": pixels[i]}
        result = fn(prompt_ids=ids, generator=gen, **image, **kw)
        total = total + result.stats
        outputs.append(result.tokens)
    return total, outputs


def run_spec_eval(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | list[dict]],
    gammas: Sequence[int],
    *,
    max_new_tokens: int,
    modes: Sequence[str] = MODES,
    sampling_temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    out_dir: Path,
    stop_at_eos: bool = False,
    warmup: bool = True,
    target_ref: str | None = None,
    draft_ref: str | None = None,
    target_identity: str | None = None,
    draft_identity: str | None = None,
    data_source: str | None = None,
    data_seed: int | None = None,
    records_skipped: int = 0,
    pixel_values: Sequence[torch.Tensor | None] | None = None,
) -> dict:
    """Evaluate ``draft`` as a speculative drafter for ``target``; write ``report.json``,
    ``report.md`` and ``block_efficiency.png`` into ``out_dir``; return the report dict.

    Both models must use ``tokenizer``. Prompts are plain strings, chat message lists or token ids; an image
    prompt (a vision-language target) is its token ids, image tokens included, with its ``pixel_values[i]``
    (``[1, 3, H, W]``, given to the first forward of target and draft).
    Each prompt i is decoded with a generator seeded ``seed + i`` in every run.

    The report names what it measured: ``target`` and ``draft`` (``*_ref``: the model reference
    given, ``*_identity``: the loaded model's identity, and the parameter count), ``data``
    (``data_source``, the number of prompts, ``data_seed`` (default ``seed``) and the
    ``records_skipped`` as malformed) and ``settings``; a name not given is recorded as null.
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    if not gammas or any(g < 1 for g in gammas):
        raise ValueError(f"gammas must be a non-empty list of integers >= 1 (got {list(gammas)})")
    n_tok = len(tokenizer)
    for name, model in (("target", target), ("draft", draft)):
        if logits_width(model) < n_tok:
            raise ValueError(
                f"the {name} produces {logits_width(model)} logits per position but the tokenizer has {n_tok} "
                "tokens; draft and target must share the tokenizer and vocabulary"
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    prompts_ids = [list(p) if _is_ids(p) else prompt_ids(tokenizer, p, f"prompt {i}") for i, p in enumerate(prompts)]
    if pixel_values is not None and len(pixel_values) != len(prompts_ids):
        raise ValueError(f"{len(pixel_values)} pixel_values for {len(prompts_ids)} prompts; give one per prompt")
    first_image = {} if pixel_values is None or pixel_values[0] is None else {"pixel_values": pixel_values[0]}
    eos = eos_token_ids(tokenizer, target) if stop_at_eos else None
    n_target, n_draft = _n_params(target), _n_params(draft)
    common = dict(max_new_tokens=max_new_tokens, sampling_temperature=sampling_temperature, top_p=top_p, eos_token_id=eos)

    if warmup:  # first calls pay one-time costs (allocator, kernels) that would bias the first timing
        short = dict(common, max_new_tokens=min(4, max_new_tokens))
        autoregressive_generate(target, prompts_ids[0], **short, **first_image)
        speculative_generate(target, draft, prompts_ids[0], gamma=max(gammas), **short, **first_image)

    rows: list[dict[str, Any]] = []
    baselines: dict[str, dict[str, Any]] = {}
    for mode in modes:
        greedy = mode == "greedy"
        ar_stats, ar_out = _run_all(
            lambda **kw: autoregressive_generate(target, **kw), prompts_ids, seed, pixel_values, greedy=greedy,
            **common)
        baselines[mode] = ar_stats.to_dict()
        for gamma in gammas:
            st, out = _run_all(
                lambda **kw: speculative_generate(target, draft, gamma=gamma, **kw),
                prompts_ids,
                seed,
                pixel_values,
                greedy=greedy,
                **common,
            )
            alpha = st.acceptance_rate
            row = {
                "mode": mode,
                "gamma": gamma,
                **st.to_dict(),
                "expected_block_efficiency": expected_block_efficiency(alpha, gamma) if st.tested else None,
                "mbsu": mbsu(st.block_efficiency, gamma, n_draft, n_target),
                "speedup": st.tokens_per_s / ar_stats.tokens_per_s,
                "target_tokens_per_s": ar_stats.tokens_per_s,
            }
            if greedy:  # lossless check: greedy speculative decoding must reproduce the target exactly
                row["matches_target_greedy"] = out == ar_out
            rows.append({k: (_finite(v) if isinstance(v, float) else v) for k, v in row.items()})

    report = {
        "kind": "spec-eval",
        "target": {"ref": target_ref, "identity": target_identity, "params": n_target},
        "draft": {"ref": draft_ref, "identity": draft_identity, "params": n_draft},
        "data": {"source": data_source, "prompts": len(prompts_ids), "seed": seed if data_seed is None else data_seed,
                 "records_skipped": records_skipped},
        "settings": {
            "prompts": len(prompts_ids),
            "gammas": list(gammas),
            "modes": list(modes),
            "max_new_tokens": max_new_tokens,
            "sampling_temperature": sampling_temperature,
            "top_p": top_p,
            "seed": seed,
            "stop_at_eos": stop_at_eos,
            "device": str(next(target.parameters()).device),
            "dtype": str(next(target.parameters()).dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "warmup": warmup,
        },
        "models": {"target_params": n_target, "draft_params": n_draft},
        "baseline": {m: {k: _finite(v) for k, v in b.items()} for m, b in baselines.items()},
        "results": rows,
    }
    _atomic_write(out_dir / "report.json", lambda f: json.dump(report, f, indent=2))
    _atomic_write(out_dir / "report.md", lambda f: f.write(render_markdown(report)))
    _atomic_write(out_dir / "block_efficiency.png", lambda f: plot_block_efficiency(report, f), binary=True)
    return report


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _model_line(role: str, info: dict, extra: str = "") -> str:
    ref = f"`{info['ref']}`" if info.get("ref") else "a model passed in memory"
    identity = f", identity `{info['identity']}`" if info.get("identity") else ""
    return f"- {role}: {ref}{identity}, {info['params']:,} parameters{extra}"


def render_markdown(report: dict) -> str:
    s, m = report["settings"], report["models"]
    t = report.get("target", {"params": m["target_params"]})
    d = report.get("draft", {"params": m["draft_params"]})
    data = report.get("data", {"prompts": s["prompts"], "seed": s["seed"]})
    source = f"`{data['source']}`" if data.get("source") else "prompts passed in memory"
    skipped = f", {data['records_skipped']} malformed record(s) skipped" if data.get("records_skipped") else ""
    from_file = bool(data.get("source")) and not str(data["source"]).startswith("bundled:")
    how = "its first readable records" if from_file else f"seed {data['seed']}"
    lines = [
        "# Speculative decoding evaluation",
        "",
        _model_line("Target", t),
        _model_line("Draft", d, f" ({d['params'] / t['params']:.1%} of the target)"),
        f"- Data: {data['prompts']} prompts from {source} ({how}){skipped}",
        f"- Settings: gamma {' '.join(map(str, s['gammas']))}; modes {', '.join(s['modes'])}; "
        f"{s['max_new_tokens']} new tokens per prompt (stop at EOS: {s['stop_at_eos']}); sampling temperature "
        f"{s['sampling_temperature']}, top-p {s['top_p']}, prompt i sampled with seed {s['seed']} + i; "
        f"{s.get('dtype', 'n/a')} on {s['device']}, {s.get('torch_threads')} torch threads; "
        f"warm-up: {s.get('warmup', 'n/a')}",
        "",
        "alpha = accepted / tested proposals; beta = mean of sum_v min(p, q) (greedy: argmax agreement) over "
        "tested contexts; tau = tokens per target call; E[tau] = (1 - alpha^(gamma+1)) / (1 - alpha); "
        "MBSU = tau / (1 + gamma * N_draft / N_target); speed-up = tokens/s over the target's own KV-cached decoding.",
        "",
        "| mode | gamma | alpha | beta | tau measured | E[tau] from alpha | MBSU | speed-up | tokens/s | lossless check |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        check = _fmt(r["matches_target_greedy"]) if "matches_target_greedy" in r else "-"
        lines.append(
            f"| {r['mode']} | {r['gamma']} | {_fmt(r['acceptance_rate'])} | {_fmt(r['beta_mean'])} | "
            f"{_fmt(r['block_efficiency'])} | {_fmt(r['expected_block_efficiency'])} | {_fmt(r['mbsu'])} | "
            f"{_fmt(r['speedup'], 2)}x | {_fmt(r['tokens_per_s'], 1)} | {check} |"
        )
    lines += ["", "Target alone: " + ", ".join(
        f"{mode} {_fmt(b['tokens_per_s'], 1)} tokens/s" for mode, b in report["baseline"].items()
    ) + ".", ""]
    return "\n".join(lines)


def plot_block_efficiency(report: dict, handle: Any) -> None:
    """Block efficiency vs gamma per mode: measured (solid) and i.i.d. estimate from alpha (dashed)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for mode in report["settings"]["modes"]:
        rows = [r for r in report["results"] if r["mode"] == mode]
        gammas = [r["gamma"] for r in rows]
        measured = [r["block_efficiency"] if r["block_efficiency"] is not None else float("nan") for r in rows]
        estimate = [
            r["expected_block_efficiency"] if r["expected_block_efficiency"] is not None else float("nan") for r in rows
        ]
        (line,) = ax.plot(gammas, measured, marker="o", label=f"{mode}: measured")
        ax.plot(gammas, estimate, marker="x", linestyle="--", color=line.get_color(), label=f"{mode}: E[tau] from alpha")
    all_g = report["settings"]["gammas"]
    ax.plot(all_g, [g + 1 for g in all_g], color="grey", linewidth=0.8, linestyle=":", label="upper bound gamma+1")
    ax.set_xlabel("gamma (draft tokens per round)")
    ax.set_ylabel("block efficiency (tokens per target call)")
    ax.set_xticks(all_g)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(handle, format="png", dpi=110)
