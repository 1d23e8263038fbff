"""`stillroom run` with teacher.source=remote (our server on loopback) and =ensemble, against online."""

from cli_helpers import assert_same_losses, stillroom
from helpers import load_saved
from loopback import serve, teacher_app

FP32 = {"micro_batch_size": 4, "precision": "fp32", "warmup_steps": 1, "lr": 1e-3, "steps": 3}
QUIET = ["eval.before=false", "eval.generations=0"]


def test_remote_teacher_with_full_top_k_matches_online(recipe_factory, tmp_path, tiny_teacher_dir):
    model, tok = load_saved(tiny_teacher_dir)
    vocab = model.config.vocab_size
    with serve(teacher_app(model, tok, max_top_k=vocab)) as server:
        recipe = recipe_factory(train=FP32)
        stillroom("run", str(recipe), "name=online", *QUIET)
        stillroom("run", str(recipe), "name=remote", "teacher.source=remote", f"teacher.remote.url={server.url}",
                  "teacher.remote.model=tiny", f"teacher.remote.top_k={vocab}", *QUIET)
    assert_same_losses(tmp_path / "runs" / "remote", tmp_path / "runs" / "online", abs=1e-4)
    assert (tmp_path / "runs" / "remote" / "remote_cache.jsonl").stat().st_size > 0


def test_ensemble_of_the_same_teacher_twice_matches_online(recipe_factory, tmp_path, tiny_teacher_dir):
    recipe = recipe_factory(train=FP32)
    stillroom("run", str(recipe), "name=online", *QUIET)
    member = f"{{source: online, dtype: float32, model: {{path: {tiny_teacher_dir}}}}}"
    stillroom("run", str(recipe), "name=ens", "teacher.source=ensemble", f"teacher.ensemble=[{member}, {member}]", *QUIET)
    assert_same_losses(tmp_path / "runs" / "ens", tmp_path / "runs" / "online", abs=1e-5)
