"""The Llama teacher (exact joint, conditionals, a Hugging Face folder) and the generator/guidance network."""

import pytest
import torch

from stillroom.config.autoregressive import ArTeacherConfig
from stillroom.domains.autoregressive.nets import build_net, load_net, save_net
from stillroom.domains.autoregressive.teacher import build_llama, load_teacher, next_token_probs, teacher_joint


def test_teacher_joint_sums_to_one_and_agrees_with_its_conditionals(tmp_path):
    model = build_llama(ArTeacherConfig(hidden_size=8, layers=1, heads=2, intermediate_size=16), vocab=4, seed=0)
    joint = teacher_joint(model.eval(), 4, 4)
    assert joint.shape == (4, 4, 4, 4) and float(joint.sum()) == pytest.approx(1.0, abs=1e-9)
    seq = torch.tensor([[2, 0, 3, 1]])
    probs = next_token_probs(model, seq, 4)[0]
    by_chain = float(probs[0, 2] * probs[1, 0] * probs[2, 3] * probs[3, 1])
    assert float(joint[2, 0, 3, 1]) == pytest.approx(by_chain, rel=1e-5)
    model.save_pretrained(tmp_path / "t")
    loaded = load_teacher(tmp_path / "t", 4, "test")
    assert torch.allclose(teacher_joint(loaded, 4, 4), joint, atol=1e-7)
    with pytest.raises(ValueError, match="vocab_size 5; the codebook needs 9"):
        load_teacher(tmp_path / "t", 8, "autoregressive.teacher.path")
    with pytest.raises(ValueError, match="has no config.json"):
        load_teacher(tmp_path, 4, "autoregressive.teacher.path")


def test_network_features_read_only_the_prefix_and_folders_round_trip(tmp_path):
    net = build_net({"hidden": 8, "head_width": 8, "time_features": 4}, seed=1)
    seq = torch.randn(2, 4, 2)
    changed = seq.clone()
    changed[:, 2] += 5.0
    f, g = net.features(seq), net.features(changed)
    assert torch.allclose(f[:, :3], g[:, :3]) and not torch.allclose(f[:, 3], g[:, 3])
    assert net.generate(seq).shape == (2, 4, 2)
    save_net(net, tmp_path / "g")
    assert torch.equal(load_net(tmp_path / "g", "test").generate(seq), net.generate(seq))
    with pytest.raises(ValueError, match="is not a generator folder"):
        load_net(tmp_path, "autoregressive student")
