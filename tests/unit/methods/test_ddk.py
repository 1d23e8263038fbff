"""DDK: the domain-factor math by hand, the domain sampler (determinism, state, timing of
re-estimation, ranks), clear errors, and exact resume through the CLI on tiny models."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from stillroom.data.batch import Example
from stillroom.methods.ddk import (
    DomainSampler, domain_sets, initial_weights, total_variation, update_weights, write_ddk_report,
)

E = math.e


# ---------------------------------------------------------------------------- factor math
def test_initial_weights_are_softmax_of_ratios():
    r0 = initial_weights([1.0, 2.0])
    assert r0 == pytest.approx([1 / (1 + E), E / (1 + E)], rel=1e-12)


def test_smoothed_update_by_hand():
    # psi = r * exp(ratio) = [0.5 e, 0.5 e^3]; psi / sum = [1, e^2] / (1 + e^2); r' = 0.5 q + 0.5 / 2
    r1 = update_weights([0.5, 0.5], [1.0, 3.0], smoothing=0.5)
    q = [1 / (1 + E**2), E**2 / (1 + E**2)]
    assert r1 == pytest.approx([0.5 * q[0] + 0.25, 0.5 * q[1] + 0.25], rel=1e-12)
    # history matters: the same ratios from a different r give a different r'
    r_other = update_weights([0.9, 0.1], [1.0, 3.0], smoothing=0.5)
    psi = [0.9 * E, 0.1 * E**3]
    assert r_other == pytest.approx([0.5 * p / sum(psi) + 0.25 for p in psi], rel=1e-12)
    assert sum(r1) == pytest.approx(1.0) and sum(r_other) == pytest.approx(1.0)


def test_floor_and_no_smoothing_modes():
    r = [0.25] * 4
    ratios = [1.0, 1.0, 1.0, 60.0]  # one domain dominates exp(ratio) completely
    smooth = update_weights(r, ratios, smoothing=0.5)
    assert min(smooth) >= (1 - 0.5) / 4 - 1e-15  # the (1 - alpha) / N floor
    assert smooth[3] == pytest.approx(0.5 + 0.125)
    no_floor = update_weights(r, ratios, smoothing=1.0)  # alpha = 1: multiplicative weights, no floor
    assert no_floor[0] < 1e-20
    none = update_weights([0.97, 0.01, 0.01, 0.01], [2.0, 1.0, 1.0, 1.0], smoothing=0.5, mode="none")
    assert none == pytest.approx(initial_weights([2.0, 1.0, 1.0, 1.0]))  # history ignored
    # huge ratios do not overflow (log-space)
    big = update_weights([0.5, 0.5], [1000.0, 999.0], smoothing=0.5)
    assert big == pytest.approx([0.5 * E / (1 + E) + 0.25, 0.5 / (1 + E) + 0.25])
    with pytest.raises(ValueError, match="smoothing_mode"):
        update_weights(r, ratios, smoothing=0.5, mode="sometimes")


def test_total_variation():
    assert total_variation([1, 0], [0, 1]) == 1.0
    assert total_variation([0.5, 0.5], [0.5, 0.5]) == 0.0


# ---------------------------------------------------------------------------- sampler
DOMAINS = {"a": list(range(0, 10)), "b": list(range(10, 13)), "c": list(range(13, 20))}


def _sampler(estimates=None, **kw):
    calls = []
    seq = iter(estimates or [])

    def estimate():
        ratio = next(seq, {"a": 1.0, "b": 2.0, "c": 1.5})
        calls.append(s.step)
        return {"ratio": dict(ratio), "ppl_student": dict(ratio), "ppl_teacher": {d: 1.0 for d in ratio}}

    args = dict(n=20, batch_size=4, seed=3, indices_by_domain=DOMAINS, calls_per_step=2, interval_steps=3,
                smoothing=0.5, smoothing_mode="smooth", estimate=estimate)
    args.update(kw)
    s = DomainSampler(**args)
    return s, calls


def test_sampler_is_deterministic_and_state_round_trips():
    s1, _ = _sampler()
    s2, _ = _sampler()
    a = [s1.next_indices() for _ in range(30)]
    assert a == [s2.next_indices() for _ in range(30)]
    s3, _ = _sampler()
    for _ in range(11):
        s3.next_indices()
    state = json.loads(json.dumps(s3.state_dict()))  # JSON-able
    s4, calls4 = _sampler()
    s4.load_state_dict(state)
    assert [s4.next_indices() for _ in range(19)] == a[11:]
    assert s4.snapshot() == s1.snapshot()
    other, _ = _sampler(seed=4)
    assert [other.next_indices() for _ in range(30)] != a


def test_reestimates_at_the_first_draw_of_every_kth_step():
    ratios = [{"a": 1.0, "b": 3.0, "c": 1.0}, {"a": 2.0, "b": 1.0, "c": 1.0}, {"a": 1.0, "b": 1.0, "c": 1.0}]
    s, calls = _sampler(ratios)
    for _ in range(2 * 7):  # 7 steps of 2 micro-batches
        s.next_indices()
    assert calls == [0, 3, 6]
    r0 = initial_weights([1.0, 3.0, 1.0])
    r1 = update_weights(r0, [2.0, 1.0, 1.0], smoothing=0.5)
    assert s.weights == pytest.approx(update_weights(r1, [1.0, 1.0, 1.0], smoothing=0.5))
    snap = s.snapshot()
    assert snap["ddk/updated"] == 1.0 and snap["ddk/ratio/a"] == 1.0 and snap["ddk/max_ratio"] == 1.0
    s.next_indices()
    s.next_indices()
    assert s.snapshot()["ddk/updated"] == 0.0
    # a resumed sampler at a step boundary re-estimates there too (the checkpoint is taken before the draw)
    s2, calls2 = _sampler(ratios)
    for _ in range(6):
        s2.next_indices()
    s3, calls3 = _sampler(ratios[1:])
    s3.load_state_dict(s2.state_dict())
    s3.next_indices()
    assert calls3 == [3]


def test_domain_frequencies_follow_weights_and_domains_cycle():
    s, _ = _sampler(interval_steps=10_000, batch_size=50)
    s.next_indices()
    s.weights = [0.7, 0.1, 0.2]
    picks = [i for _ in range(200) for i in s.next_indices()]
    dom = ["a" if i < 10 else "b" if i < 13 else "c" for i in picks]
    n = len(dom)
    assert dom.count("a") / n == pytest.approx(0.7, abs=0.02)
    assert dom.count("b") / n == pytest.approx(0.1, abs=0.02)
    # every pass over a domain is a permutation of it (cycled and reshuffled when exhausted)
    fresh, _ = _sampler(interval_steps=10_000, batch_size=50)
    fresh.weights = [0.0, 1.0, 0.0]
    fresh.updated_at = 0
    got = [i for _ in range(4) for i in fresh.next_indices()][:12]
    for k in range(0, 12, 3):
        assert sorted(got[k:k + 3]) == [10, 11, 12]
    assert got[:3] != got[3:6] or got[3:6] != got[6:9]  # reshuffled between passes


def test_ranks_split_the_one_process_batch():
    one, _ = _sampler(batch_size=4)
    r0, _ = _sampler(batch_size=2, rank=0, world_size=2)
    r1, _ = _sampler(batch_size=2, rank=1, world_size=2)
    for _ in range(10):
        assert one.next_indices() == r0.next_indices() + r1.next_indices()


def test_sampler_refuses_mismatched_state_and_sizes():
    s, _ = _sampler()
    s.next_indices()
    state = s.state_dict()
    other, _ = _sampler(seed=9)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a DDK sampler"):
        other.load_state_dict({"epoch": 0, "position": 0})
    with pytest.raises(ValueError, match="21"):
        _sampler(n=21)


# ---------------------------------------------------------------------------- domain sets
def _ex(uid, domain):
    return Example(input_ids=[1, 2, 3], target=[True] * 3, uid=uid, domain=domain)


def test_domain_sets_and_errors():
    train = [_ex(f"t{i}", "xy"[i % 2]) for i in range(6)]
    held = [_ex(f"h{i}", "xy"[i % 2]) for i in range(6)]
    groups, val = domain_sets(train, held, cap=2)
    assert groups == {"x": [0, 2, 4], "y": [1, 3, 5]}
    assert [e.uid for e in val["x"]] == ["h0", "h2"]
    with pytest.raises(ValueError, match="at least 2 domains"):
        domain_sets([_ex("a", "x")], [_ex("b", "x")], cap=5)
    with pytest.raises(ValueError, match=r"\['y'\] have no steering sequences.*ddk.steer_fraction"):
        domain_sets(train, [e for e in held if e.domain == "x"], cap=5)
    with pytest.raises(ValueError, match="no domain.*data.sources"):
        domain_sets([_ex("a", None)], held, cap=5)


# ---------------------------------------------------------------------------- through the CLI
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def _recipe(tmp_path: Path, teacher_dir: Path, **over) -> Path:
    import random

    rng = random.Random(0)
    prose = [{"text": " ".join(rng.choice(WORDS) for _ in range(30))} for _ in range(40)]
    nums = [{"text": " ".join(f"{rng.randint(0, 99)}+{rng.randint(0, 99)}" for _ in range(12))} for _ in range(40)]
    for name, rows in (("prose", prose), ("nums", nums)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "ddk", "output_dir": str(tmp_path / "runs"), "method": "ddk",
        "teacher": {"model": {"path": str(teacher_dir)}, "dtype": "float32"},
        "student": {"from_teacher": {"strategy": "every_n", "every_n": 2}},
        "data": {"sources": [{"path": str(tmp_path / "prose.jsonl"), "domain": "prose"},
                             {"path": str(tmp_path / "nums.jsonl"), "domain": "nums"}],
                 "seq_len": 24, "heldout_fraction": 0.25, "heldout_max": 40},
        "ddk": {"interval_steps": 3, "val_max_per_domain": 4, "steer_fraction": 0.2},
        "loss": {"terms": [{"name": "ce"}, {"name": "forward_kl", "weight": 0.2}], "chunk_tokens": 64},
        "train": {"steps": 8, "micro_batch_size": 2, "grad_accum": 2, "precision": "fp32", "warmup_steps": 0,
                  "lr": 3e-3, "save_every": 2, "keep_checkpoints": 10},
        "eval": {"heldout_sequences": 4, "batch_size": 4, "generations": 0, "before": False, "speed_tokens": 16},
    }
    for k, v in over.items():
        recipe[k] = {**recipe[k], **v} if isinstance(v, dict) else v
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _comparable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k == "loss" or k.startswith("ddk/") or k.startswith("loss/")}


def _train_only(recipe: Path, name: str, resume: bool) -> None:
    """``stillroom run RECIPE name=NAME [--resume]`` up to the end of training: the same config loading,
    preparation, method hooks and loop as the CLI, without the final evaluation and report (which
    take most of a tiny run's time; the CLI's own path is covered by the tests of the run command)."""
    from stillroom.config.load import load_config
    from stillroom.run import prepare_run
    from stillroom.train.loop import train

    cfg = load_config(recipe, [f"name={name}"])
    prep, method = prepare_run(cfg, log=lambda _m: None)
    job, _ = prep.job(prep.student, method, baseline=False, run_dir=cfg.run_dir, resume=resume, log=lambda _m: None)
    train(job)


def test_resume_matches_uninterrupted(tmp_path, tiny_teacher_dir):
    recipe = _recipe(tmp_path, tiny_teacher_dir)
    _train_only(recipe, "ddk", resume=False)
    full_dir = tmp_path / "runs" / "ddk"
    full = _records(full_dir)
    assert [r["step"] for r in full] == list(range(1, 9))
    assert sorted(k for k in full[0] if k.startswith("ddk/r/")) == ["ddk/r/nums", "ddk/r/prose"]
    assert [r["ddk/updated"] for r in full] == [1, 0, 0, 1, 0, 0, 1, 0]  # steps 0, 3, 6 (logged as 1, 4, 7)
    assert sum(full[-1][f"ddk/r/{d}"] for d in ("nums", "prose")) == pytest.approx(1.0)
    assert {round(full[0][f"ddk/r/{d}"], 12) for d in ("nums", "prose")} != {0.5}  # r_0 from the ratios
    for resume_at in (4, 6):  # 4: inside an interval; 6: at a re-estimation step
        name = f"resumed{resume_at}"
        shutil.copytree(full_dir, tmp_path / "runs" / name)
        for ck in (tmp_path / "runs" / name / "checkpoints").glob("step_*"):
            if int(ck.name.split("_")[1]) > resume_at:
                shutil.rmtree(ck)
        _train_only(recipe, name, resume=True)  # the loop and hooks exactly as `run --resume` uses them, without the report
        resumed = _records(tmp_path / "runs" / name)
        assert [r["step"] for r in resumed] == list(range(1, 9))
        for a, b in zip(full, resumed):
            assert _comparable(a) == pytest.approx(_comparable(b), abs=1e-6), (resume_at, a["step"])


def test_report_from_metrics(tmp_path):
    from stillroom.methods.ddk_report import read_ddk_trace, weight_oscillation

    rows = []
    for step in range(1, 7):
        r = [0.2, 0.8] if step < 3 else [0.6, 0.4] if step < 5 else [0.3, 0.7]
        rows.append({"step": step, "loss": 1.0, "ddk/r/a": r[0], "ddk/r/b": r[1], "ddk/ratio/a": 1.0 + step,
                     "ddk/ratio/b": 2.0, "ddk/updated": float(step in (1, 3, 5))})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trace = read_ddk_trace(tmp_path / "metrics.jsonl")
    assert trace["domains"] == ["a", "b"] and trace["updates"] == [1, 3, 5]
    assert weight_oscillation(trace) == pytest.approx([0.4, 0.3])
    summary = write_ddk_report(tmp_path)
    assert (tmp_path / "ddk_domains.png").is_file()
    text = (tmp_path / "ddk.md").read_text()
    assert "| a | 0.200 | 0.300 | 2.000 | 7.000 |" in text and summary["mean_tv"] == pytest.approx(0.35)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no ddk"):
        write_ddk_report(tmp_path)


def test_cli_refuses_a_single_domain(tmp_path, tiny_teacher_dir, capsys):
    from stillroom.cli.main import main

    recipe = _recipe(tmp_path, tiny_teacher_dir)
    cfg = yaml.safe_load(recipe.read_text())
    cfg["data"]["sources"][1]["domain"] = "prose"
    recipe.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "at least 2 domains" in err and "domain" in err


def test_shipped_recipe_validates():
    from stillroom.config.load import load_config

    cfg = load_config(Path(__file__).resolve().parents[3] / "recipes" / "ddk.yaml")
    assert cfg.method == "ddk" and cfg.ddk.smoothing == 0.5 and cfg.ddk.smoothing_mode == "smooth"
    terms = {t.name: t.weight for t in cfg.loss.terms}
    assert terms == {"ce": 1.0, "forward_kl": 0.2} and cfg.loss.loss_temperature == 1.0
    assert len({s.domain for s in cfg.data.sources}) == len(cfg.data.sources) >= 2


def test_steering_split_is_apart_from_the_report_and_training(tmp_path, tiny_teacher_dir):
    from stillroom.config.load import load_config
    from stillroom.run import prepare_run

    prep, _ = prepare_run(load_config(_recipe(tmp_path, tiny_teacher_dir), []), log=lambda _m: None)
    steer = {e.uid for e in prep.data.steer}
    assert steer and {e.domain for e in prep.data.steer} == {"prose", "nums"}
    assert not steer & {e.uid for e in prep.data.heldout} and not steer & {e.uid for e in prep.data.train}


def test_cli_run_writes_the_domain_report(tmp_path, tiny_teacher_dir):
    """`stillroom run` end to end with method ddk: metrics carry the domain weights and the run
    folder gets ddk.md / ddk_domains.png next to report.md (the method's report hook)."""
    from stillroom.cli.main import main

    recipe = _recipe(tmp_path, tiny_teacher_dir, train={"steps": 4, "save_every": 0})
    assert main(["run", str(recipe)]) == 0
    run_dir = tmp_path / "runs" / "ddk"
    for name in ("report.md", "ddk.md", "ddk_domains.png"):
        assert (run_dir / name).is_file(), name
    assert "ddk/r/prose" in _records(run_dir)[-1]
