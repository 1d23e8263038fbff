"""method=dmd through the real CLI: the 4-step decoupled-hybrid recipe (CA below the input level, DM over the
full range, backward simulation, the GAN head on) trains a generator and its fake-score critic end to end, the
critic is checkpointed, and a run stopped and resumed logs the uninterrupted run's losses exactly."""

import json

import pytest
from cli_helpers import assert_same_losses, stillroom, stillroom_torchrun
from safetensors import safe_open

TINY = ["generative.train_points=256", "generative.heldout_points=64", "generative.teacher.steps=20",
        "generative.teacher.batch_size=64", "generative.teacher.arch.width=16", "generative.teacher.arch.depth=2",
        "generative.teacher.sample_steps=4", "generative.eval.samples_per_class=20", "generative.eval.projections=8",
        "generative.eval.teacher_steps=[1]", "train.micro_batch_size=16", "train.log_every=1",
        "train.keep_checkpoints=1", "train.save_every=3", "eval.before=false", "dmd.critic_updates=2",
        "dmd.gan_weight=0.01"]


def test_decoupled_dmd_trains_both_players_and_resumes_exactly(tmp_path):
    cache = tmp_path / "cache"

    def run(name, steps, *more):
        return stillroom("run", "decoupled_dmd_rings", f"output_dir={tmp_path}", f"cache_dir={cache}", *TINY,
                         f"name={name}", f"train.steps={steps}", *more)

    run("full", 6)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert {"loss/dm", "loss/ca", "loss/gan", "dmd/variance", "dmd/norm_dm", "dmd/norm_ca", "critic/loss",
            "critic/loss/denoise", "critic/loss/gan_head"} <= set(rows[0])
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert report["student_after"]["nfe"] == 4 and "swd_teacher" in report["student_after"]
    ckpt = sorted((tmp_path / "full" / "checkpoints").glob("step_*"))[-1]
    names = {p.name for p in ckpt.iterdir()}
    assert any(n.startswith("critic") for n in names), names
    with safe_open(str(next(p for p in ckpt.iterdir() if p.name.startswith("critic.objective"))), "pt") as f:
        assert any(k.startswith("net.") for k in f.keys())  # the GAN head is checkpointed with the critic

    run("part", 3)
    resumed = run("part", 6, "--resume")
    assert "resumed from" in resumed.stdout
    assert_same_losses(tmp_path / "part", tmp_path / "full", abs=1e-6, steps=6)
    critic = [json.loads(line)["critic/loss"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert critic == [r["critic/loss"] for r in rows]


@pytest.mark.multiproc
def test_two_processes_train_generator_and_critic_and_resume_exactly(tmp_path):
    """Under torchrun both players train (DDP), and a 2-process run stopped and resumed logs the uninterrupted one's
    losses: every step re-seeds each process's noise from (seed, step, rank)."""
    cache = tmp_path / "cache"

    def run(name, steps, *more):
        return stillroom_torchrun("run", "decoupled_dmd_rings", f"output_dir={tmp_path}", f"cache_dir={cache}", *TINY,
                                  f"name={name}", f"train.steps={steps}", "train.micro_batch_size=8", *more)

    run("full", 4)
    run("part", 2)
    run("part", 4, "--resume")
    assert_same_losses(tmp_path / "part", tmp_path / "full", abs=1e-6, steps=4)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("critic/loss" in r for r in rows)


def test_the_image_recipe_trains_a_one_step_digits_generator(tmp_path):
    """dmd_digits, shortened: the UNet teacher trained into the cache, the one-step generator and its critic, and
    the image report (Fréchet distance, class accuracy, recall) for the teacher rows and the student."""
    stillroom("run", "dmd_digits", f"output_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}",
              "generative.teacher.steps=10", "generative.teacher.batch_size=32", "generative.eval.samples_per_class=10",
              "generative.eval.feature_classifier_steps=20", "generative.eval.teacher_steps=[1]",
              "generative.teacher.sample_steps=4", "train.steps=2", "train.micro_batch_size=8", "dmd.critic_updates=1")
    models = json.loads((tmp_path / "dmd_digits" / "report.json").read_text())["models"]
    assert models["student_after"]["nfe"] == 1 and models["teacher"]["nfe"] == 8
    assert all(models[k]["frechet_distance"] > 0 for k in ("teacher", "teacher_1step", "student_after"))
    assert (tmp_path / "dmd_digits" / "samples.png").is_file()
