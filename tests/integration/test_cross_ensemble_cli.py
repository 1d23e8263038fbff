"""A cross-tokenizer run whose teacher is an ensemble (of the same teacher twice, so it must train exactly as
the online cross run does), through the real CLI."""

from cli_helpers import assert_same_losses, stillroom
from helpers import other_tokenizer

STUDENT = {"from_config": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                           "num_attention_heads": 4, "num_key_value_heads": 2}}
QUIET = ["eval.before=false", "eval.generations=0", "eval.speed_tokens=16", "eval.heldout_sequences=8"]


def test_ensemble_of_the_same_teacher_twice_matches_online(recipe_factory, tmp_path, tiny_teacher_dir):
    folder = tmp_path / "student_tok"
    other_tokenizer(400).save_pretrained(folder)
    recipe = recipe_factory(teacher={"tokenizer_mode": "cross"}, student={**STUDENT, "tokenizer": str(folder)},
                            loss={"terms": [{"name": "ce"}, {"name": "forward_kl"}], "chunk_tokens": 16},
                            train={"steps": 3, "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 1,
                                   "lr": 1e-3})
    stillroom("run", str(recipe), "name=online", *QUIET)
    member = f"{{source: online, dtype: float32, model: {{path: {tiny_teacher_dir}}}}}"
    stillroom("run", str(recipe), "name=ens", "teacher.source=ensemble", f"teacher.ensemble=[{member}, {member}]",
              *QUIET)
    assert_same_losses(tmp_path / "runs" / "ens", tmp_path / "runs" / "online", abs=1e-5)
