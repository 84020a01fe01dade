"""Closed-form tests of training/losses.py. Expected numbers are worked out with scalar `math`, not by the code
under test: log(1 + e^-x) = −log σ(x), and so on."""
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from prefcurate.training import losses as L


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softplus_neg(x: float) -> float:  # −log σ(x)
    return math.log1p(math.exp(-x))


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Two pairs with ℓ = Δ_ref − Δ_θ = (0 − (−0.2), 0 − 0.1) = (0.2, −0.1).
MODEL_W, MODEL_L, REF_W, REF_L = t64(0.10, 0.20), t64(0.30, 0.10), t64(0.20, 0.20), t64(0.20, 0.20)


# ---------------------------------------------------------------- β conventions and plain DPO

def test_ln2_at_zero_logit():
    e = t64(0.3, 0.7, 0.5)
    loss, metrics = L.diffusion_dpo_loss(e, e, e, e, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert metrics["implicit_acc"].item() == 0.5  # all ties count half (diffusers form)
    assert metrics["reward_margin"].item() == 0.0


def test_two_pair_batch_hand_computed():
    # β = 10 -> k = 5 -> z = (1.0, −0.5)
    loss, metrics = L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2, rel=1e-12)
    assert metrics["logits"].tolist() == pytest.approx([1.0, -0.5])
    assert metrics["implicit_acc"].item() == 0.5
    assert metrics["reward_margin"].item() == pytest.approx(0.25)
    assert metrics["raw_model_loss"].item() == pytest.approx(0.5 * (0.15 + 0.2))
    assert metrics["raw_ref_loss"].item() == pytest.approx(0.2)


def test_salesforce_5000_equals_diffusers_2500():
    torch.manual_seed(0)
    model_w, model_l, ref_w, ref_l = (0.1 + 1e-4 * torch.randn(8, dtype=torch.float64) for _ in range(4))
    salesforce, metrics = L.diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=5000.0)
    converted, _ = L.diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=L.beta_from_diffusers(2500))
    # the diffusers SD1.5 expression, written out: −logsigmoid(beta_dpo · (ref_diff − model_diff))
    diffusers = -F.logsigmoid(2500 * ((ref_w - ref_l) - (model_w - model_l))).mean()
    assert salesforce.item() == pytest.approx(diffusers.item(), rel=1e-12)
    assert converted.item() == pytest.approx(diffusers.item(), rel=1e-12)
    assert metrics["logits"].abs().max().item() > 0.3  # the logits are not trivially zero


def test_beta_conversions():
    assert L.dpo_logit_scale(5000) == 2500
    assert L.beta_from_diffusers(2500) == 5000
    assert L.beta_from_diffusers(5000, "sdxl") == 5000
    assert L.beta_from_adaptive_dpo(1000) == 2000
    assert L.beta_from_sum_of_squares(2.0, 4 * 8 * 8) == 2 * 2.0 * 256
    with pytest.raises(ValueError, match="beta"):
        L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=0.0)
    with pytest.raises(ValueError, match="script"):
        L.beta_from_diffusers(2500, "sd3")  # type: ignore[arg-type]


def test_sum_of_squares_convention_matches_pseudo_code():
    torch.manual_seed(1)
    noise = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    preds = [noise + 0.1 * torch.randn_like(noise) for _ in range(2)]
    sums = [(p - noise).pow(2).sum(dim=(1, 2, 3)) for p in preds]  # (4,) model, ref, pseudo-code style
    model_w, model_l = sums[0].chunk(2)
    ref_w, ref_l = sums[1].chunk(2)
    beta = 0.05
    pseudo = -F.logsigmoid(-beta * ((model_w - ref_w) - (model_l - ref_l))).mean()
    means = [L.per_sample_mse(p, noise) for p in preds]
    ours, _ = L.diffusion_dpo_loss(*means[0].chunk(2), *means[1].chunk(2),
                                   beta=L.beta_from_sum_of_squares(beta, 2 * 3 * 3))
    assert ours.item() == pytest.approx(pseudo.item(), rel=1e-12)


def test_per_sample_mse_and_split():
    pred = torch.zeros(4, 2, 1, 2)
    target = torch.arange(16.0).view(4, 2, 1, 2)
    mse = L.per_sample_mse(pred, target)
    assert mse.tolist() == pytest.approx([(0 + 1 + 4 + 9) / 4, (16 + 25 + 36 + 49) / 4,
                                          (64 + 81 + 100 + 121) / 4, (144 + 169 + 196 + 225) / 4])
    assert L.per_sample_mse(pred.half(), target.half()).dtype == torch.float32
    winners, losers = L.split_winner_loser(mse)
    assert winners.tolist() == mse[:2].tolist() and losers.tolist() == mse[2:].tolist()
    with pytest.raises(ValueError, match="winners-then-losers"):
        L.split_winner_loser(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="same shape"):
        L.per_sample_mse(pred, target[:2])


def test_shape_errors():
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        L.diffusion_dpo_loss(MODEL_W, MODEL_L[:1], REF_W, REF_L, beta=1.0)
    with pytest.raises(ValueError, match="weight"):
        L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=1.0, weight=t64(1, 1, 1))
    with pytest.raises(ValueError, match="label_smoothing"):
        L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=1.0, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.balanced_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=1.0, winner_vote_fraction=t64(1.5, 0.5))


# ---------------------------------------------------------------- soft targets (cDPO / BalancedDPO)

def test_label_smoothing_zero_equals_plain_and_closed_form():
    plain, _ = L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0)
    zero, _ = L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0, label_smoothing=0.0)
    assert zero.item() == plain.item()
    # z = (1, −0.5), ε = 0.25: −0.75·log σ(z) − 0.25·log σ(−z)
    smoothed, _ = L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0, label_smoothing=0.25)
    expected = sum(0.75 * softplus_neg(z) + 0.25 * softplus_neg(-z) for z in (1.0, -0.5)) / 2
    assert smoothed.item() == pytest.approx(expected, rel=1e-12)


def test_balanced_dpo_vote_fraction():
    hard, _ = L.balanced_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0)
    plain, _ = L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0)
    assert hard.item() == plain.item()
    unanimous, _ = L.balanced_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0, winner_vote_fraction=t64(1, 1))
    assert unanimous.item() == pytest.approx(plain.item(), rel=1e-12)
    # votes 3/4 and 1/2 (a split vote decided by the human label): −v̄·log σ(z) − (1 − v̄)·log σ(−z)
    soft, metrics = L.balanced_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0,
                                        winner_vote_fraction=t64(0.75, 0.5))
    expected = (0.75 * softplus_neg(1.0) + 0.25 * softplus_neg(-1.0) + 0.5 * softplus_neg(-0.5)
                + 0.5 * softplus_neg(0.5)) / 2
    assert soft.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["vote_fraction_mean"].item() == pytest.approx(0.625)


# ---------------------------------------------------------------- Adaptive-DPO

def test_adaptive_without_weight_and_margin_is_plain_dpo():
    u = t64(0.3, 0.9)
    plain, _ = L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0)
    off, _ = L.adaptive_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, u, beta=10.0, use_weight=False, use_margin=False)
    unit, _ = L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0, weight=t64(1, 1), margin=t64(0, 0))
    assert off.item() == plain.item() and unit.item() == plain.item()
    # False really switches each part off (the official code's type=bool flags could not)
    margin_only, m = L.adaptive_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, u, beta=10.0, use_weight=False)
    assert m["weight_mean"].item() == 1.0 and m["margin_mean"].item() != 0.0
    assert margin_only.item() != plain.item()


def test_adaptive_dpo_hand_computed_batch():
    # K = 3 annotators, B = 2. Annotator 0 is the current model, ℓ = (3e-4, 4e-4).
    logits = torch.tensor([[3e-4, 4e-4], [4e-4, -3e-4], [0.0, 2e-4]], dtype=torch.float64)
    rho = 2.0
    # normalised per annotator: (0.6, 0.8), (0.8, −0.6), (0, 1); s = ρ·ℓ̂
    s = [[1.2, 1.6, 0.0], [1.6, -1.2, 2.0]]  # per pair, over annotators
    c = [sum(sig(x) for x in row) / 3 for row in s]
    std = [statistics.stdev(row) for row in s]  # unbiased: 0.8327 and 1.7436
    assert std[0] < 1 < std[1]
    v = [std[0], 1.0]  # the second is capped
    u = [(1 - ci) * vi for ci, vi in zip(c, v)]
    assert c == pytest.approx([0.700181, 0.648097], abs=1e-6) and u == pytest.approx([0.249649, 0.351903], abs=1e-6)

    metric = L.minority_metric(logits, rho=rho, normalize=True)
    assert metric.confidence.tolist() == pytest.approx(c, rel=1e-12)
    assert metric.instability.tolist() == pytest.approx(v, rel=1e-12)
    assert metric.u.tolist() == pytest.approx(u, rel=1e-12)

    # The current model's errors, chosen so that ℓ = (3e-4, 4e-4); Adaptive-DPO beta_dpo = 1000.
    model_w, model_l = t64(0.1000, 0.2000), t64(0.1003, 0.2004)
    ref_w, ref_l = t64(0.3, 0.3), t64(0.3, 0.3)
    beta = L.beta_from_adaptive_dpo(1000.0)
    weights = [1 / (10 * ui + 1) for ui in u]
    margins = [-(ui**2) / 1000 + 3.5e-4 for ui in u]
    expected = sum(w * softplus_neg(1000 * ell - g) for w, ell, g in zip(weights, (3e-4, 4e-4), margins)) / 2
    loss, metrics = L.adaptive_dpo_loss(model_w, model_l, ref_w, ref_l, metric.u, beta=beta, k1=10.0, c1=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert L.adaptive_weight(metric.u).tolist() == pytest.approx(weights, rel=1e-12)
    ell = L.dpo_raw_logits(model_w, model_l, ref_w, ref_l)
    assert L.adaptive_margin(metric.u, ell, beta=beta).tolist() == pytest.approx(margins, rel=1e-9)
    assert metrics["weight_mean"].item() == pytest.approx(sum(weights) / 2)
    assert metrics["minority_u"].item() == pytest.approx(sum(u) / 2)
    assert metrics["logits"].tolist() == pytest.approx([0.3, 0.4], rel=1e-9)


def test_minority_metric_std_cap_and_single_annotator():
    logits = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    # no normalisation, ρ = 3: s = (3, −3, 0) per pair; std = 3 -> capped at the given cap
    assert L.minority_metric(logits, rho=3.0, normalize=False, std_cap=1.0).instability.tolist() == [1.0, 1.0]
    assert L.minority_metric(logits, rho=3.0, normalize=False, std_cap=5.0).instability.tolist() == [3.0, 3.0]
    single = L.minority_metric(t64(2.0, -2.0)[None], rho=1.0, normalize=False)  # K = 1: u = 1 − σ(s)
    assert single.u.tolist() == pytest.approx([1 - sig(2.0), 1 - sig(-2.0)], rel=1e-12)
    zeros = L.minority_metric(torch.zeros(3, 4), rho=15.0)  # an all-zero batch must not produce NaN
    assert zeros.u.tolist() == [0.0] * 4
    with pytest.raises(ValueError, match=r"\(K, B\)"):
        L.minority_metric(t64(1.0, 2.0))


def test_weight_types():
    u = t64(0.0, 0.25, 1.0)
    expected = {
        "linear": [1.0, 1 / 1.5, 1 / 3],
        "quadratic": [1.0, 1 / 1.125, 1 / 3],
        "sigmoid": [0.5, 1 / (math.exp(0.5) + 1), 1 / (math.exp(2) + 1)],
        "sqrt": [0.5, 1 / (math.e + 1), 1 / (math.exp(2) + 1)],
    }
    for weight_type, values in expected.items():
        assert L.adaptive_weight(u, weight_type, k1=2.0, c1=1.0).tolist() == pytest.approx(values, rel=1e-12)
    with pytest.raises(ValueError, match="weight_type"):
        L.adaptive_weight(u, "quardratic")  # type: ignore[arg-type]


def test_margin_types_and_scale():
    u, ell = t64(0.5, 1.0), t64(1e-4, 3e-4)  # mean ℓ = 2e-4; β = 2000 -> k = 1000
    assert L.adaptive_margin(u, ell, beta=2000.0).tolist() == pytest.approx([-0.25e-3 + 2e-4, -1e-3 + 2e-4])
    assert L.adaptive_margin(u, ell, beta=2000.0, margin_type="linear").tolist() == pytest.approx(
        [-0.5e-3 + 2e-4, -1e-3 + 2e-4])
    # margin_scale = k: the u-term in logit units, Γ = −u² + mean(ℓ)
    assert L.adaptive_margin(u, ell, beta=2000.0, margin_scale=1000.0).tolist() == pytest.approx(
        [-0.25 + 2e-4, -1.0 + 2e-4])


def test_combine_minority_scores():
    online, offline = t64(0.2, 0.6), t64(0.5, 0.1)
    assert L.combine_minority_scores(online, offline, "online").tolist() == [0.2, 0.6]
    assert L.combine_minority_scores(None, offline, "offline").tolist() == [0.5, 0.1]
    assert L.combine_minority_scores(online, offline, "max").tolist() == [0.5, 0.6]
    assert L.combine_minority_scores(online, offline, "mean").tolist() == pytest.approx([0.35, 0.35])
    with pytest.raises(ValueError, match="offline_u"):
        L.combine_minority_scores(online, None, "max")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        L.combine_minority_scores(online, t64(1.5, 0.0), "mean")
    with pytest.raises(ValueError, match="NaN"):
        L.combine_minority_scores(None, t64(float("nan"), 0.0), "offline")
    with pytest.raises(ValueError, match="mode"):
        L.combine_minority_scores(online, offline, "min")  # type: ignore[arg-type]


# ---------------------------------------------------------------- IPO, SFT, CPO

def test_ipo_closed_form():
    # ℓ = (0.005, 0.015); β_ipo = 100 -> target 1/(2·100) = 0.005
    model_w, model_l, ref = t64(0.0, 0.0), t64(0.005, 0.015), t64(0.0, 0.0)
    loss, metrics = L.ipo_loss(model_w, model_l, ref, ref, beta_ipo=100.0)
    assert loss.item() == pytest.approx((0.0 + 0.01**2) / 2, rel=1e-9)
    weighted, _ = L.ipo_loss(model_w, model_l, ref, ref, beta_ipo=100.0, weight=t64(1.0, 0.5))
    assert weighted.item() == pytest.approx(0.5 * 0.01**2 / 2, rel=1e-9)
    assert metrics["implicit_acc"].item() == 1.0


def test_sft_is_winner_mse():
    torch.manual_seed(2)
    pred, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    loss, _ = L.sft_loss(L.per_sample_mse(pred, noise))
    assert loss.item() == pytest.approx(F.mse_loss(pred, noise).item(), rel=1e-6)


def test_cpo_closed_form():
    # β = 20 -> k = 10; z = −10·(e_w − e_l) = (1, −2); λ·mean(e_w) = 0.5·0.2
    loss, metrics = L.cpo_loss(t64(0.1, 0.3), t64(0.2, 0.1), beta=20.0, sft_weight=0.5)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2 + 0.5 * 0.2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["logits"].tolist() == pytest.approx([1.0, -2.0])


# ---------------------------------------------------------------- NCP-DPO

ALPHAS_CUMPROD = t64(0.9, 0.8, 0.6, 0.3)


def test_ddpm_reverse_step_closed_form():
    x_t, z = torch.ones(1, 1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, 1, dtype=torch.float64)
    eps = torch.zeros_like(x_t)
    # t = 2: α = 0.6/0.8 = 0.75; σ² = (1 − 0.8)/(1 − 0.6)·(1 − 0.75) = 0.125
    out = L.ddpm_reverse_step(x_t, eps, torch.tensor([2]), ALPHAS_CUMPROD, z)
    assert out.item() == pytest.approx(1 / math.sqrt(0.75) + math.sqrt(0.125), rel=1e-12)
    # with ε = 1 and z = 0: (1 − 0.25/√0.4)/√0.75
    out = L.ddpm_reverse_step(x_t, torch.ones_like(x_t), torch.tensor([2]), ALPHAS_CUMPROD, torch.zeros_like(z))
    assert out.item() == pytest.approx((1 - 0.25 / math.sqrt(0.4)) / math.sqrt(0.75), rel=1e-12)
    assert L.ncp_previous_timestep(torch.tensor([0, 1, 3])).tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match="index"):
        L.ddpm_reverse_step(x_t, eps, torch.tensor([4]), ALPHAS_CUMPROD, z)
    with pytest.raises(ValueError, match="integer"):
        L.ddpm_reverse_step(x_t, eps, torch.tensor([2.0]), ALPHAS_CUMPROD, z)


def test_ncp_identity_encoder_is_t_weighted_mse():
    torch.manual_seed(3)
    x_t, eps, z = (torch.randn(3, 2, 4, 4, dtype=torch.float64) for _ in range(3))
    eps_theta = eps + 0.1 * torch.randn_like(eps)
    t = torch.tensor([0, 2, 3])  # t = 0 is clamped to 1
    target = L.ddpm_reverse_step(x_t, eps, t, ALPHAS_CUMPROD, z)
    assert torch.equal(L.ddpm_reverse_step(x_t, eps, t, ALPHAS_CUMPROD, z), target)
    pred = L.ddpm_reverse_step(x_t, eps_theta, t, ALPHAS_CUMPROD, z)
    # ((1 − α_t)/(√α_t·√(1 − ᾱ_t)))², by hand: t=1: (1/9)²/((8/9)·0.2) = 1/14.4; t=2: 0.0625/(0.75·0.4);
    # t=3: α = 0.5, (0.5)²/(0.5·0.7)
    weights = t64(1 / 14.4, 0.0625 / 0.3, 0.25 / 0.35)
    expected = weights * L.per_sample_mse(eps_theta, eps)
    assert L.perceptual_distance(pred, target).tolist() == pytest.approx(expected.tolist(), rel=1e-10)
    assert L.perceptual_distance(target, target).tolist() == [0.0, 0.0, 0.0]


def test_perceptual_distance_feature_lists():
    a, b = torch.zeros(2, 3), torch.zeros(2, 1, 1)
    a_target, b_target = torch.ones(2, 3), torch.full((2, 1, 1), 3.0)
    # per sample: (3·1 + 1·9) / 4 elements = 3
    assert L.perceptual_distance([a, b], [a_target, b_target]).tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="same number"):
        L.perceptual_distance([a, b], [a_target])


def test_ncp_dpo_is_dpo_on_perceptual_distances():
    ncp, ncp_metrics = L.ncp_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0)
    dpo, _ = L.diffusion_dpo_loss(MODEL_W, MODEL_L, REF_W, REF_L, beta=10.0)
    assert ncp.item() == dpo.item()
    assert ncp_metrics["logits"].tolist() == pytest.approx([1.0, -0.5])


# ---------------------------------------------------------------- gradients

def test_gradients_reach_the_policy_only():
    model_w, model_l = MODEL_W.clone().requires_grad_(), MODEL_L.clone().requires_grad_()
    ref_w, ref_l = REF_W.clone().requires_grad_(), REF_L.clone().requires_grad_()
    u = t64(0.3, 0.8).requires_grad_()  # as if someone forgot to detach it
    raw_logits = L.dpo_raw_logits(model_w, model_l, ref_w, ref_l)  # (0.2, −0.1), requires grad
    weight, margin = L.adaptive_weight(u), L.adaptive_margin(u, raw_logits, beta=10.0)
    assert not weight.requires_grad and not margin.requires_grad
    assert not L.minority_metric(torch.stack([model_w, model_l]), rho=1.0).u.requires_grad
    loss, metrics = L.adaptive_dpo_loss(model_w, model_l, ref_w, ref_l, u, beta=10.0)
    assert loss.requires_grad and not any(m.requires_grad for m in metrics.values())
    loss.backward()
    assert model_w.grad is not None and model_l.grad is not None
    assert ref_w.grad is None and ref_l.grad is None and u.grad is None
    # d/d model_w of −W·log σ(k·ℓ − Γ)/B with W, Γ constant: W·k·σ(−(z − Γ))/B (ℓ falls with model_w)
    k, z = 5.0, torch.tensor([1.0, -0.5], dtype=torch.float64)
    expected = weight * k * torch.sigmoid(-(z - margin)) / 2
    assert model_w.grad.tolist() == pytest.approx(expected.tolist(), rel=1e-9)


def test_dpo_gradcheck():
    torch.manual_seed(4)
    model_w, model_l = (torch.rand(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ref_w, ref_l = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    weight, margin, smoothing = t64(1.0, 0.5, 0.25), t64(0.1, -0.2, 0.0), t64(0.0, 0.1, 0.3)

    def loss_fn(w: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        return L.diffusion_dpo_loss(w, lo, ref_w, ref_l, beta=4.0, weight=weight, margin=margin,
                                    label_smoothing=smoothing)[0]

    assert torch.autograd.gradcheck(loss_fn, (model_w, model_l))
    assert torch.autograd.gradcheck(lambda w, lo: L.cpo_loss(w, lo, beta=4.0)[0], (model_w, model_l))


# ---------------------------------------------------------------- every loss type runs

LOSS_CALLS = {
    "dpo": lambda e: L.diffusion_dpo_loss(*e, beta=5000.0),
    "adaptive-dpo": lambda e: L.adaptive_dpo_loss(
        *e, L.minority_metric(torch.stack([L.dpo_raw_logits(*e).detach()] * 3)).u, beta=2000.0),
    "balanced-dpo": lambda e: L.balanced_dpo_loss(*e, beta=5000.0, winner_vote_fraction=torch.full((4,), 0.75)),
    "ncp-dpo": lambda e: L.ncp_dpo_loss(*e, beta=5000.0),
    "cpo": lambda e: L.cpo_loss(e[0], e[1], beta=5000.0),
    "sft": lambda e: L.sft_loss(e[0]),
    "ipo": lambda e: L.ipo_loss(*e, beta_ipo=1000.0),
}


def test_loss_calls_cover_loss_types():
    assert tuple(LOSS_CALLS) == L.LOSS_TYPES


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_every_loss_type_is_finite_and_trains_the_policy(loss_type):
    torch.manual_seed(5)
    model_w, model_l = (0.1 + 1e-3 * torch.rand(4)).requires_grad_(), (0.1 + 1e-3 * torch.rand(4)).requires_grad_()
    errors = (model_w, model_l, 0.1 + 1e-3 * torch.rand(4), 0.1 + 1e-3 * torch.rand(4))
    loss, metrics = LOSS_CALLS[loss_type](errors)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert model_w.grad is not None and bool(model_w.grad.abs().sum() > 0)
    assert all(not m.requires_grad for m in metrics.values())


# ---------------------------------------------------------------- v-prediction targets (Salimans & Ho 2022)

ABAR = t64(0.64, 0.36, 0.25)  # √ᾱ = 0.8, 0.6, 0.5; √(1 − ᾱ) = 0.6, 0.8, √0.75


def test_velocity_closed_form_and_prediction_target():
    x0, eps, t = t64(1.0, 1.0).view(2, 1), t64(2.0, 2.0).view(2, 1), torch.tensor([0, 1])
    # v = √ᾱ·ε − √(1 − ᾱ)·x0: 0.8·2 − 0.6·1 = 1.0 and 0.6·2 − 0.8·1 = 0.4
    assert L.velocity(x0, eps, t, ABAR).flatten().tolist() == pytest.approx([1.0, 0.4], abs=1e-12)
    assert L.prediction_target("v_prediction", x0, eps, t, ABAR).flatten().tolist() == pytest.approx([1.0, 0.4])
    assert L.prediction_target("epsilon", x0, eps, t, ABAR) is eps
    with pytest.raises(ValueError, match="prediction_type"):
        L.prediction_target("sample", x0, eps, t, ABAR)
    with pytest.raises(ValueError, match="index alphas_cumprod"):
        L.velocity(x0, eps, torch.tensor([0, 3]), ABAR)


def test_velocity_matches_the_diffusers_scheduler():
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(L.velocity(x0, eps, t, scheduler.alphas_cumprod), scheduler.get_velocity(x0, eps, t))


def test_epsilon_and_x0_from_v_invert_the_forward_process():
    x0, eps, t = t64(1.0, -0.5, 3.0).view(3, 1), t64(2.0, 0.25, -1.0).view(3, 1), torch.tensor([0, 1, 2])
    a, s = ABAR[t].sqrt().view(3, 1), (1 - ABAR[t]).sqrt().view(3, 1)
    x_t = a * x0 + s * eps
    v = L.velocity(x0, eps, t, ABAR)
    torch.testing.assert_close(L.epsilon_from_v(v, x_t, t, ABAR), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(L.x0_from_v(v, x_t, t, ABAR), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(L.epsilon_from_prediction("v_prediction", v, x_t, t, ABAR), eps, rtol=0, atol=1e-12)
    assert L.epsilon_from_prediction("epsilon", eps, x_t, t, ABAR) is eps
    # hand-computed first row: ε = 0.8·v + 0.6·x_t with x_t = 0.8 + 1.2 = 2.0 and v = 1.0: 0.8 + 1.2 = 2.0
    assert float(x_t[0]) == pytest.approx(2.0) and float(v[0]) == pytest.approx(1.0)


def test_ncp_reverse_step_of_a_v_model_is_the_x0_form_posterior_mean():
    """Ho et al. 2020 Eq. 7: μ = (√ᾱ_{t−1}·β_t·x̂0 + √α_t·(1 − ᾱ_{t−1})·x_t)/(1 − ᾱ_t), x̂0 from v."""
    g = torch.Generator().manual_seed(3)
    x_t, v = torch.randn(2, 4, dtype=torch.float64, generator=g), torch.randn(2, 4, dtype=torch.float64, generator=g)
    t = torch.tensor([1, 2])
    step = L.ddpm_reverse_step(x_t, L.epsilon_from_prediction("v_prediction", v, x_t, t, ABAR), t, ABAR,
                               torch.zeros_like(x_t))
    abar_t, abar_prev = ABAR[t].view(2, 1), ABAR[t - 1].view(2, 1)
    alpha_t = abar_t / abar_prev
    mu = (abar_prev.sqrt() * (1 - alpha_t) * L.x0_from_v(v, x_t, t, ABAR)
          + alpha_t.sqrt() * (1 - abar_prev) * x_t) / (1 - abar_t)
    torch.testing.assert_close(step, mu, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- offline (curation) and online (training) agree

@pytest.mark.parametrize("weight_type", ["linear", "quadratic", "sigmoid", "sqrt"])
@pytest.mark.parametrize("margin_type", ["quadratic", "linear"])
def test_offline_and_online_weight_and_margin_agree(weight_type, margin_type):
    """The Polars W and Γ of curation.labels.pair_metrics and the torch W and Γ of training.losses on the same 50 u
    values: equal up to float rounding, with β converted once (canonical β = 2·beta_dpo) and no offset (the
    online margin's batch-mean term is 0 when every ℓ is 0)."""
    import numpy as np
    import polars as pl

    from prefcurate.curation.labels.pair_metrics import PairMetricsConfig, adaptive_margin, reweight

    u = np.random.default_rng(0).uniform(0.0, 1.0, 50)
    config = PairMetricsConfig(k1=3.0, c1=0.5, weight_type=weight_type, beta=700.0, margin_type=margin_type,
                               margin_scale=40.0)
    offline = pl.DataFrame({"u": u}).select(weight=reweight(pl.col("u"), config),
                                            margin=adaptive_margin(pl.col("u"), 0.0, config))
    u_t = torch.tensor(u, dtype=torch.float64)
    weight = L.adaptive_weight(u_t, weight_type, k1=config.k1, c1=config.c1)
    margin = L.adaptive_margin(u_t, torch.zeros_like(u_t), beta=L.beta_from_adaptive_dpo(config.beta),
                               margin_type=margin_type, margin_scale=config.margin_scale)
    assert weight.tolist() == pytest.approx(offline["weight"].to_list(), rel=1e-12)
    assert margin.tolist() == pytest.approx(offline["margin"].to_list(), rel=1e-12)
    # and the defaults of both sides are the same constants (prefcurate.data_schemas.adaptive)
    default = PairMetricsConfig()
    assert (default.k1, default.c1, default.weight_type, default.margin_type, default.margin_scale, default.rho) == (
        L.adaptive.K1, L.adaptive.C1, L.adaptive.WEIGHT_TYPE, L.adaptive.MARGIN_TYPE, L.adaptive.MARGIN_SCALE,
        L.adaptive.RHO)
