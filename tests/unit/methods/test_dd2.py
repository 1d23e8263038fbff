"""DD2's losses (GTS, FCS, CSD in its SiD and DMD forms) and its guidance freezing."""

import pytest
import torch

from stillroom.config.autoregressive import ArToyConfig
from stillroom.domains.autoregressive.nets import build_net
from stillroom.domains.autoregressive.toy import build_toy
from stillroom.methods.dd2 import TeacherView, csd_loss, fcs_loss, frozen, gts_loss, noisy


def _teacher_view():
    """A teacher whose next-token probabilities are the toy's true conditionals (no network needed)."""
    toy = build_toy(ArToyConfig())

    class TrueConditionals(TeacherView):
        def probs(self, tokens_bn):
            p = self.joint
            rows = []
            for seq in tokens_bn.tolist():
                prefixes = [p[tuple(seq[:i])].reshape(8, -1).sum(1) for i in range(4)]
                rows.append(torch.stack([m / m.sum() for m in prefixes]))
            return torch.stack(rows).float()

    return TrueConditionals(None, toy.codebook_vd, toy.probs), toy


def test_loss_shapes_and_counts():
    q = torch.randn(5, 4, 2, requires_grad=True)
    mu_phi, mu_psi = torch.randn(5, 4, 2), torch.randn(5, 4, 2)
    for total, count in (gts_loss(mu_psi, mu_phi), fcs_loss(mu_psi, q), csd_loss(q, mu_phi, mu_psi, "sid"),
                         csd_loss(q, mu_phi, mu_psi, "dmd")):
        assert total.dim() == 0 and count == 20
    with pytest.raises(ValueError, match="sid or dmd"):
        csd_loss(q, mu_phi, mu_psi, "kl")


@pytest.mark.parametrize("form", ["sid", "dmd"])
def test_csd_gradient_moves_tokens_from_the_fake_prediction_towards_the_teachers(form):
    q = torch.zeros(3, 4, 2, requires_grad=True)
    mu_phi = torch.tensor([1.0, 0.0]).expand(3, 4, 2)  # the teacher points right
    mu_psi = torch.tensor([-1.0, 0.0]).expand(3, 4, 2)  # the generator's own distribution sits left
    total, _ = csd_loss(q, mu_phi, mu_psi, form)
    total.backward()
    step = -q.grad  # gradient descent direction
    assert (step[..., 0] > 0).all() and torch.allclose(step[..., 1], torch.zeros(3, 4))
    if form == "dmd":  # the normalised DMD direction: (mu_psi - mu_phi) / mean|q - mu_phi| = (-2, 0) / 0.5
        assert torch.allclose(q.grad, torch.tensor([-4.0, 0.0]).expand(3, 4, 2))


def test_csd_is_zero_when_guidance_matches_the_teacher():
    q = torch.randn(2, 4, 2, requires_grad=True)
    mu = torch.randn(2, 4, 2)
    total, _ = csd_loss(q, mu, mu.clone(), "sid")
    assert float(total.detach()) == 0.0


def test_fcs_is_denoising_score_matching_towards_the_samples():
    q = torch.randn(4, 4, 2)
    assert float(fcs_loss(q.clone(), q)[0]) == 0.0
    assert float(fcs_loss(q + 1.0, q)[0]) == pytest.approx(4 * 4 * 2)


def test_frozen_leaves_no_gradient_on_the_guidance_and_restores_it():
    net = build_net({"hidden": 8, "head_width": 8, "time_features": 4}, seed=0)
    x = torch.randn(2, 4, 2, requires_grad=True)
    with frozen(net) as g:
        g(x, torch.full((2, 4), 0.5), x.detach()).sum().backward()
    assert all(p.grad is None for p in net.parameters()) and x.grad is not None
    assert all(p.requires_grad for p in net.parameters())


def test_gts_reduces_the_score_error_on_a_fixed_batch():
    teacher, toy = _teacher_view()
    torch.manual_seed(0)
    tokens = toy.sample(128, torch.Generator().manual_seed(3))
    q = toy.codebook_vd[tokens]
    t = 0.05 + 0.9 * torch.rand(128, 4)
    x = noisy(q, t, torch.randn_like(q))
    mu_phi = teacher.mu(x, t, teacher.probs(tokens))
    net = build_net({"hidden": 16, "head_width": 32, "time_features": 8}, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = float(gts_loss(net(x, t, q), mu_phi)[0])
    for _ in range(150):
        opt.zero_grad()
        gts_loss(net(x, t, q), mu_phi)[0].backward()
        opt.step()
    assert float(gts_loss(net(x, t, q), mu_phi)[0]) < 0.3 * first


def test_teacher_view_samples_its_joint():
    teacher, toy = _teacher_view()
    torch.manual_seed(0)
    tokens = teacher.sample(50_000, torch.device("cpu"))
    from stillroom.domains.generative.toy_metrics import pair_tv

    assert pair_tv(tokens, toy.probs, 0, 1, 8) < 0.02
