"""``precision: auto`` on a CPU: bf16 only where its matmuls are measured to be faster, measured once per machine."""

from __future__ import annotations

import json
import math
import time

import pytest

from stillroom.models import precision as P


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache folder, no remembered measurement, and a CPU whose oneDNN has bf16 kernels."""
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "_onednn_has_bf16", lambda: True)
    P.cpu_bf16_speedup.cache_clear()
    yield tmp_path
    P.cpu_bf16_speedup.cache_clear()


@pytest.mark.parametrize(("measured", "chosen"), [(2.5, "bf16"), (1.25, "bf16"), (1.1, "fp32"), (0.6, "fp32")])
def test_auto_follows_the_measured_speedup(fresh, monkeypatch, measured, chosen):
    monkeypatch.setattr(P, "_time_bf16_speedup", lambda: measured)
    assert P.resolve_precision("auto", "cpu") == chosen
    assert P.resolve_dtype("auto", "cpu") == ("bfloat16" if chosen == "bf16" else "float32")
    assert P.resolve_precision("fp32", "cpu") == "fp32" and P.resolve_precision("bf16", "cpu") == "bf16"


def test_the_measurement_is_kept_per_machine_and_remeasured_when_unreadable(fresh, monkeypatch):
    timings = []
    monkeypatch.setattr(P, "_time_bf16_speedup", lambda: timings.append(1) or 0.6)
    assert P.cpu_bf16_speedup() == 0.6
    (kept,) = (fresh / "precision").glob("*.json")
    assert json.loads(kept.read_text())["bf16_speedup"] == 0.6
    P.cpu_bf16_speedup.cache_clear()  # a new process: reads the file, does not time again
    assert P.cpu_bf16_speedup() == 0.6 and len(timings) == 1
    kept.write_text("{not json")  # an interrupted writer or a hand edit: measured again, and rewritten
    P.cpu_bf16_speedup.cache_clear()
    assert P.cpu_bf16_speedup() == 0.6 and len(timings) == 2
    assert json.loads(kept.read_text())["bf16_speedup"] == 0.6
    assert not [p for p in (fresh / "precision").iterdir() if p.suffix != ".json"]  # no temporary left


def test_no_bf16_kernels_means_fp32_without_timing(fresh, monkeypatch):
    monkeypatch.setattr(P, "_onednn_has_bf16", lambda: False)
    monkeypatch.setattr(P, "_time_bf16_speedup", lambda: pytest.fail("timed although oneDNN has no bf16"))
    assert P.resolve_precision("auto", "cpu") == "fp32"


def test_the_real_probe_measures_a_ratio_and_restores_the_thread_count():
    import torch

    threads = torch.get_num_threads()
    ratio = P._time_bf16_speedup(rounds=2)
    assert math.isfinite(ratio) and ratio > 0
    assert torch.get_num_threads() == threads


def test_other_ranks_of_a_machine_take_rank_zeros_measurement(fresh, monkeypatch):
    """Under torchrun a bf16 rank beside an fp32 one would train two different models: local rank > 0 waits for
    local rank 0's file and reads it, measuring nothing itself."""
    import threading

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(P, "_time_bf16_speedup", lambda: pytest.fail("a rank > 0 measured"))

    def rank_zero() -> None:  # writes its measurement a little later
        time.sleep(0.5)
        P.probe_file().parent.mkdir(parents=True, exist_ok=True)
        P.probe_file().write_text(json.dumps({"bf16_speedup": 2.5}))

    writer = threading.Thread(target=rank_zero)
    writer.start()
    assert P.resolve_precision("auto", "cpu") == "bf16"
    writer.join()


def test_a_cache_that_cannot_be_written_still_resolves(fresh, monkeypatch):
    (fresh / "precision").write_text("a file where the folder should be")  # mkdir fails: OSError
    monkeypatch.setattr(P, "_time_bf16_speedup", lambda: 2.0)
    assert P.resolve_precision("auto", "cpu") == "bf16"
