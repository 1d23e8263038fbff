"""The routed denoiser (MSD): routing by label, gradients per member, folders, and the refusals."""

import json
import re

import pytest
import torch

from stillroom.config.generative import GenerativeConfig, equal_groups
from stillroom.domains.generative.conventions import Convention
from stillroom.domains.generative.models import DENOISER_FILE, build_denoiser, load_denoiser, save_denoiser
from stillroom.domains.generative.routed import RoutedDenoiser, UnknownConditionError, check_routes

ARCH = {"dim": 2, "width": 16, "depth": 2, "time_features": 8, "class_features": 4}
GROUPS = [[0, 3], [1], [2]]


def member(seed: int, width: int = 16, conv: Convention = Convention("edm")):
    return build_denoiser("mlp", {**ARCH, "width": width}, num_classes=4, convention=conv, seed=seed)


def routed(groups=GROUPS) -> RoutedDenoiser:
    return RoutedDenoiser([member(k, width=8 + 4 * k) for k in range(len(groups))], groups)


def batch(labels: list[int]):
    gen = torch.Generator().manual_seed(0)
    n = len(labels)
    return torch.randn(n, 2, generator=gen), torch.rand(n, generator=gen) * 3 + 0.1, torch.tensor(labels)


def test_routing_by_label_equals_each_member_on_its_own_samples():
    model = routed()
    x, t, labels = batch([2, 0, 1, 3, 3, 2, 0])
    out = model(x, t, labels)
    for k, group in enumerate(GROUPS):
        mine = torch.isin(labels, torch.tensor(group))
        assert torch.allclose(out[mine], model.members[k](x[mine], t[mine], labels[mine]), atol=1e-6)


def test_null_label_is_the_mean_of_the_members_null_predictions():
    model = routed()
    x, t, _ = batch([0, 0, 0])
    null = torch.full((3,), 4)
    want = torch.stack([m(x, t, null) for m in model.members]).mean(0)
    assert torch.allclose(model(x, t, null), want, atol=1e-6)


def test_gradients_reach_only_the_member_of_the_samples():
    model = routed()
    x, t, labels = batch([0, 3, 2, 0])  # members 0 and 2; member 1 owns class 1, absent here
    model(x, t, labels).pow(2).sum().backward()
    grads = [sum(float(p.grad.abs().sum()) if p.grad is not None else 0.0 for p in m.parameters())
             for m in model.members]
    assert grads[0] > 0 and grads[2] > 0 and grads[1] == 0
    # member 0's gradient is exactly what it gets alone on its own samples
    alone = member(0, width=8)
    mine = torch.isin(labels, torch.tensor(GROUPS[0]))
    alone(x[mine], t[mine], labels[mine]).pow(2).sum().backward()
    for p, q in zip(model.members[0].parameters(), alone.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_save_load_round_trip_and_one_member_alone(tmp_path):
    model = routed()
    save_denoiser(model, tmp_path / "r")
    info = json.loads((tmp_path / "r" / DENOISER_FILE).read_text())
    assert info["kind"] == "routed" and info["arch"]["groups"] == GROUPS
    loaded = load_denoiser(tmp_path / "r")
    assert isinstance(loaded, RoutedDenoiser) and loaded.groups == GROUPS
    x, t, labels = batch([0, 1, 2, 3, 4])
    assert torch.equal(model(x, t, labels), loaded(x, t, labels))
    one = load_denoiser(tmp_path / "r" / "members" / "1")
    assert one.kind == "mlp" and one.width == 12
    x1, t1, l1 = batch([1, 1])
    assert torch.equal(one(x1, t1, l1), model(x1, t1, l1))
    assert json.loads((tmp_path / "r" / "members" / "1" / DENOISER_FILE).read_text())["routed_member"]["classes"] == [1]


def test_describe_reports_params_per_member():
    model = routed()
    text = model.describe()
    sizes = [sum(p.numel() for p in m.parameters()) for m in model.members]
    assert f"at most {max(sizes):,} params" in text and all(f"{n:,}" in text for n in sizes)


def test_unknown_label_is_refused_with_the_named_error():
    model = routed()
    x, t, _ = batch([0, 0])
    with pytest.raises(UnknownConditionError, match=r"labels \[5\] are in no group"):
        model(x, t, torch.tensor([0, 5]))
    with pytest.raises(UnknownConditionError, match=r"labels \[-1\]"):
        model(x, t, torch.tensor([-1, 0]))


@pytest.mark.parametrize("groups, word", [([[0, 1], [2]], "missing [3]"), ([[0, 1], [1, 2, 3]], "repeated [1]"),
                                          ([[0, 1, 2, 3], [4]], "outside [0, 4) [4]"), ([[0, 1, 2, 3], []], "non-empty")])
def test_bad_partitions_are_refused(groups, word):
    with pytest.raises(ValueError, match="routed denoiser: groups .*" + re.escape(word)):
        RoutedDenoiser([member(k) for k in range(len(groups))], groups)


def test_members_must_agree():
    with pytest.raises(ValueError, match="differs from member 0"):
        RoutedDenoiser([member(0), member(1, conv=Convention("rf"))], [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="2 members for 3 groups"):
        RoutedDenoiser([member(0), member(1)], GROUPS)


def test_check_routes_refuses_another_partition_or_a_plain_folder():
    check_routes(routed(), GROUPS, "here")
    with pytest.raises(ValueError, match="here: the folder routes the groups"):
        check_routes(routed(), [[0], [1], [2, 3]], "here")
    with pytest.raises(ValueError, match="not a routed one"):
        check_routes(member(0), GROUPS, "here")


def test_config_partition_is_checked_when_the_config_is_loaded():
    sec = GenerativeConfig.model_validate({"classes": 4, "student": {"route": {"members": 2}}})
    assert sec.student.route.partition(4) == [[0, 1], [2, 3]]
    assert equal_groups(5, 2) == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match=r"generative.student.route.groups: groups .* missing \[3\]"):
        GenerativeConfig.model_validate({"classes": 4, "student": {"route": {"groups": [[0, 1], [2]]}}})
    with pytest.raises(ValueError, match="exactly one of `members`"):
        GenerativeConfig.model_validate({"student": {"route": {"members": 2, "groups": [[0, 1], [2, 3]]}}})
    with pytest.raises(ValueError, match="member_paths: 1 folders for 2 groups"):
        GenerativeConfig.model_validate({"student": {"route": {"members": 2, "member_paths": ["a"]}}})
    with pytest.raises(ValueError, match="cannot split 2 classes into 3"):
        GenerativeConfig.model_validate({"dataset": "moons", "student": {"route": {"members": 3}}})
