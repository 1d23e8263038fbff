"""``report.json`` and ``report.md`` of a ``stillroom distill-data`` run (written atomically)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from stillroom.config.schema import RunConfig
from stillroom.domains.vision.ast.experts import Trajectories
from stillroom.domains.vision.ast.realdata import RealData
from stillroom.domains.vision.ast.synthetic import SyntheticSet
from stillroom.run.folder import write_atomic
from stillroom.train.session import TrainResult


def mean_speed(experts: Trajectories) -> list[float]:
    """Per epoch, the experts' mean ``||theta_(e+1) - theta_e||``."""
    speeds = [e["speed"] for e in experts.manifest["experts"]]
    return [statistics.fmean(col) for col in zip(*speeds)]


def write_report(run_dir: Path, cfg: RunConfig, data: RealData, experts: Trajectories, synthetic: SyntheticSet,
                 evaluation: dict, result: TrainResult) -> dict:
    """Write both reports; returns the JSON one."""
    expert_acc = [e["heldout_accuracy"] for e in experts.manifest["experts"]]
    report = {
        "command": "distill-data", "method": "ast", "name": cfg.name, "dataset": data.name,
        "ipc": cfg.ast.ipc, "synthetic_images": len(synthetic.labels), "heldout_images": len(data.test_y),
        "arch": cfg.classifier.student.own_fields(), "settings": cfg.ast.model_dump(mode="json"),
        "outer_iterations": result.steps, "final_match_loss": result.final_loss,
        "train_seconds": round(result.train_seconds, 2),
        "experts": {"folder": str(experts.folder), "count": len(expert_acc),
                    "heldout_accuracy_mean": statistics.fmean(expert_acc), "speed_per_epoch": mean_speed(experts)},
        **evaluation,
        "files": ["synthetic.safetensors", "synthetic_grid.png", "random_subset_grid.png", "metrics.jsonl"],
    }
    write_atomic(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(run_dir / "report.md", _markdown(report))
    return report


def _markdown(r: dict) -> str:
    d, real = r["distilled"], r["random_real"]
    speed = ", ".join(f"{v:.3f}" for v in r["experts"]["speed_per_epoch"])
    return "\n".join([
        f"# {r['name']}: AST dataset distillation of {r['dataset']}", "",
        f"{r['synthetic_images']} synthetic images ({r['ipc']} per class), {r['outer_iterations']} outer iterations "
        f"of trajectory matching against {r['experts']['count']} expert trajectories (final matching loss "
        f"{r['final_match_loss']:.4f}).", "",
        "| training set | images | held-out accuracy (mean ± std) | networks | lr |", "|---|---|---|---|---|",
        f"| distilled | {r['synthetic_images']} | {100 * d['mean']:.1f}% ± {100 * d['std']:.1f} | "
        f"{len(d['accuracy'])} | {d['lr']:.4g} (learned) |",
        f"| random real subset | {r['synthetic_images']} | {100 * real['mean']:.1f}% ± {100 * real['std']:.1f} | "
        f"{len(real['accuracy'])} | {real['lr']:.4g} |",
        f"| experts (all real training images) | - | {100 * r['experts']['heldout_accuracy_mean']:.1f}% (mean) | "
        f"{r['experts']['count']} | - |", "",
        f"Fresh networks: {r['arch']['kind']} as classifier.student, {r['settings']['eval_epochs']} epochs each, "
        f"tested on the {r['heldout_images']} held-out images.", "",
        f"Expert trajectory speed ||theta(e+1) - theta(e)|| per epoch (mean over experts): {speed}", "",
        "![synthetic_grid.png](synthetic_grid.png)", "", "![random_subset_grid.png](random_subset_grid.png)", "",
    ])
