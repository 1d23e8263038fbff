"""DDK's report: the per-domain weights and ratios of a run, from its ``metrics.jsonl``.

:func:`write_ddk_report` writes ``ddk_domains.png`` (weights and ratios over steps) and ``ddk.md``
next to ``report.md`` after a ``method: ddk`` run (the method plan's ``report`` slot).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

PREFIX = "ddk"
"""Metric prefix of DDK's per-step metrics (``ddk/r/<domain>``, ``ddk/ratio/<domain>``, ...)."""


def total_variation(a: Sequence[float], b: Sequence[float]) -> float:
    """``0.5 * sum_i |a_i - b_i|`` (0: same weights, 1: disjoint)."""
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b))


def read_ddk_trace(metrics_path: Path) -> dict[str, Any]:
    """From ``metrics.jsonl``: steps, per-domain weight and ratio traces, and the re-estimation steps."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if any(k.startswith(f"{PREFIX}/r/") for k in r)]
    if not rows:
        raise ValueError(f"{metrics_path}: no ddk/* metrics (was this a method=ddk run?)")
    domains = sorted(k.split("/", 2)[2] for k in rows[0] if k.startswith(f"{PREFIX}/r/"))
    trace = {"steps": [r["step"] for r in rows], "domains": domains,
             "r": {d: [r[f"{PREFIX}/r/{d}"] for r in rows] for d in domains},
             "ratio": {d: [r[f"{PREFIX}/ratio/{d}"] for r in rows] for d in domains},
             "updates": [r["step"] for r in rows if r.get(f"{PREFIX}/updated")]}
    return trace


def weight_oscillation(trace: dict[str, Any]) -> list[float]:
    """Total variation between consecutive distinct weight vectors (one value per re-estimation after r_0)."""
    vectors = [[trace["r"][d][i] for d in trace["domains"]] for i in range(len(trace["steps"]))]
    tvs, prev = [], vectors[0]
    for v in vectors[1:]:
        if v != prev:
            tvs.append(total_variation(prev, v))
            prev = v
    return tvs


def write_ddk_report(run_dir: Path) -> dict[str, Any]:
    """``ddk_domains.png`` (weights and ratios over steps) and ``ddk.md`` in ``run_dir`` from its metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    tr = read_ddk_trace(run_dir / "metrics.jsonl")
    fig, (ax_r, ax_x) = plt.subplots(1, 2, figsize=(10, 3.6))
    for d in tr["domains"]:
        ax_r.plot(tr["steps"], tr["r"][d], label=d, drawstyle="steps-post")
        ax_x.plot(tr["steps"], tr["ratio"][d], label=d, drawstyle="steps-post")
    ax_r.set(title="domain weights r", xlabel="step", ylim=(0, 1))
    ax_x.set(title="perplexity ratio student/teacher", xlabel="step")
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "ddk_domains.png", dpi=110)
    plt.close(fig)
    tvs = weight_oscillation(tr)
    lines = ["# DDK domain weights", "", "| domain | r first | r last | ratio first | ratio last |", "|---|---|---|---|---|"]
    for d in tr["domains"]:
        r, x = tr["r"][d], tr["ratio"][d]
        lines.append(f"| {d} | {r[0]:.3f} | {r[-1]:.3f} | {x[0]:.3f} | {x[-1]:.3f} |")
    mean_tv = sum(tvs) / len(tvs) if tvs else 0.0
    lines += ["", f"Re-estimations logged: {len(tr['updates'])}; mean total variation between consecutive weight "
              f"vectors: {mean_tv:.4f}.", "", "![domain weights](ddk_domains.png)", ""]
    (run_dir / "ddk.md").write_text("\n".join(lines))
    return {"domains": tr["domains"], "mean_tv": mean_tv, "final_r": {d: tr["r"][d][-1] for d in tr["domains"]},
            "final_ratio": {d: tr["ratio"][d][-1] for d in tr["domains"]}}
