"""``stillroom distill-data`` through the real CLI on tiny settings: the report and both grids, and SIGKILL +
``--resume`` ending with the synthetic images of an uninterrupted run."""

import json

import torch
from cli_helpers import completed_checkpoints, stillroom, stillroom_sigkilled
from safetensors.torch import load_file

TINY = ["classifier.student.kind=cnn", "classifier.student.channels=[2]", "ast.ipc=2", "ast.syn_steps=4",
        "ast.expert_epochs=2", "ast.max_start_epoch=2", "ast.intermediate_matching=true", "ast.balance_loss=true",
        "ast.weight_perturb=1.0", "ast.init=representative", "ast.eval_networks=2", "ast.eval_epochs=10",
        "ast.experts.count=2", "ast.experts.epochs=4", "ast.experts.clip_loss=true",
        "ast.experts.gradient_penalty=2.0", "train.save_every=1", "train.keep_checkpoints=1"]


def _args(out, cache, name, steps):
    return ["ast_digits", f"output_dir={out}", f"cache_dir={cache}", f"name={name}", f"train.steps={steps}", *TINY]


def test_distill_data_reports_and_resumes_exactly(tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    proc = stillroom("distill-data", *_args(out, cache, "whole", 10))
    run_dir = out / "whole"
    assert "experts: 2 trajectories" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["synthetic_images"] == 20 and report["outer_iterations"] == 10
    for arm in ("distilled", "random_real"):
        assert len(report[arm]["accuracy"]) == 2 and 0.0 <= report[arm]["mean"] <= 1.0
    assert len(report["experts"]["speed_per_epoch"]) == 4
    for name in ("report.md", "synthetic_grid.png", "random_subset_grid.png", "synthetic.safetensors"):
        assert (run_dir / name).is_file(), name
    assert "![synthetic_grid.png](synthetic_grid.png)" in (run_dir / "report.md").read_text()


    killed = out / "killed"
    stillroom_sigkilled("distill-data", *_args(out, cache, "killed", 10),
                        when=lambda: len(completed_checkpoints(killed)) >= 1 and
                        (killed / "checkpoints" / "step_000002").is_dir())
    assert not (killed / "report.json").exists()
    resumed = stillroom("distill-data", *_args(out, cache, "killed", 10), "--resume")
    assert "resumed from" in resumed.stdout and "experts: cached trajectories" in resumed.stdout
    a, b = load_file(str(run_dir / "synthetic.safetensors")), load_file(str(killed / "synthetic.safetensors"))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["lr"], b["lr"])
    assert not torch.equal(a["images"], a["images"][[1, 0, *range(2, 20)]])  # the images differ from one another
