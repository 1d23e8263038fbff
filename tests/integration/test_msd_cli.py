"""MSD through the real CLI: four small routed students pre-trained with TSM (msd_tsm_rings), then the routed
student distilled into one-step generators with DMD from that folder (msd_rings); exact resume of a routed
student; a bad partition and a folder routed differently are refused before training."""

import json

import pytest
from cli_helpers import assert_same_losses, stillroom, stillroom_torchrun

TINY = ["generative.train_points=512", "generative.heldout_points=128", "generative.teacher.steps=30",
        "generative.teacher.batch_size=64", "generative.teacher.arch.width=32", "generative.teacher.arch.depth=2",
        "generative.teacher.sample_steps=8", "generative.eval.samples_per_class=40", "generative.eval.projections=16",
        "generative.eval.teacher_steps=[1]", "train.micro_batch_size=32", "train.log_every=1",
        "train.keep_checkpoints=1"]
SMALL = ["generative.student.arch.width=8", "generative.student.arch.depth=1", "generative.student.steps=4",
         "train.schedule=constant", "train.warmup_steps=0", "train.save_every=3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("msd_cache")


@pytest.fixture(scope="module")
def tsm_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("msd_runs")
    proc = stillroom("run", "msd_tsm_rings", f"output_dir={out}", f"cache_dir={cache}", *TINY, *SMALL,
                     "train.steps=6")
    return out, proc


def test_tsm_members_then_one_step_dmd_from_their_folder(tsm_run, cache):
    out, proc = tsm_run
    assert "routed denoiser of 4 members" in proc.stdout and "training: 6 steps (tsm)" in proc.stdout
    student = out / "msd_tsm_rings" / "student"
    info = json.loads((student / "denoiser.json").read_text())
    assert info["kind"] == "routed" and info["arch"]["groups"] == [[0], [1], [2], [3]]
    assert all(json.loads((student / "members" / str(k) / "denoiser.json").read_text())["arch"]["width"] == 8
               for k in range(4))
    dmd = stillroom("run", "msd_rings", f"output_dir={out}", f"cache_dir={cache}", *TINY, "train.steps=2",
                    f"generative.student.path={student}", "dmd.critic_updates=2")
    assert "training: 2 steps (dmd)" in dmd.stdout and "routed denoiser of 4 members" in dmd.stdout
    report = json.loads((out / "msd_rings" / "report.json").read_text())
    assert report["student_after"]["nfe"] == 1 and "swd_teacher" in report["student_after"]
    assert json.loads((out / "msd_rings" / "student" / "denoiser.json").read_text())["kind"] == "routed"


def test_routed_student_resumes_exactly(tsm_run, cache):
    out, _ = tsm_run
    args = ["msd_tsm_rings", f"output_dir={out}", f"cache_dir={cache}", *TINY, *SMALL, "name=part"]
    stillroom("run", *args, "train.steps=3", "eval.before=false")
    resumed = stillroom("run", *args, "train.steps=6", "--resume")
    assert "resumed from" in resumed.stdout
    assert_same_losses(out / "part", out / "msd_tsm_rings", abs=1e-6, steps=6)


def test_bad_partition_and_a_differently_routed_folder_are_refused(tsm_run, cache):
    out, _ = tsm_run
    base = [f"output_dir={out}", f"cache_dir={cache}", *TINY]
    gap = stillroom("run", "msd_tsm_rings", *base, "generative.student.route={groups: [[0, 1], [2]]}", check=False)
    assert gap.returncode != 0 and "not a partition of the 4 classes" in gap.stderr and "missing [3]" in gap.stderr
    other = stillroom("run", "msd_rings", *base, f"generative.student.path={out / 'msd_tsm_rings' / 'student'}",
                      "generative.student.route={members: 2}", "name=other", check=False)
    assert other.returncode != 0 and "the folder routes the groups [[0], [1], [2], [3]]" in other.stderr
    assert "training:" not in other.stdout


@pytest.mark.multiproc
def test_a_routed_student_trains_under_two_processes_with_idle_members(tmp_path, cache):
    """2 samples per process over 4 routed members: a member with no sample on a process still joins DDP's gradient
    reduction (it used to stop the run: 'Expected to have finished reduction')."""
    stillroom_torchrun("run", "msd_tsm_rings", f"output_dir={tmp_path}", f"cache_dir={cache}", *TINY, *SMALL,
                       "train.steps=3", "train.micro_batch_size=2")
    rows = [json.loads(line) for line in (tmp_path / "msd_tsm_rings" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)
