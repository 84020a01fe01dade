"""Preference losses for text-to-image diffusion models: pure functions on per-sample tensors.

No model, optimiser or accelerator here. The trainer computes per-sample errors (``per_sample_mse`` of the
prediction against ``prediction_target``: ε, or v for v-prediction models such as SD2.x; or
``perceptual_distance`` for NCP) for the policy and the frozen reference, splits them into
winners and losers, and passes the four (B,) vectors to one of the losses below. Every loss returns
``(loss, metrics)``; metrics are detached tensors (0-dim, or (B,) for ``logits``).

β convention (the only one used in this module): Salesforce ``train.py``, docs/methods.md §1.4 / §1.7.
    ℓ_i = Δ_ref,i − Δ_θ,i,   Δ = ē_w − ē_l,   ē = mean over C, H, W of the squared ε (or v) error  (``dpo_raw_logits``)
    z_i = k·ℓ_i,   k = β/2  (``dpo_logit_scale``),   β = Salesforce ``beta_dpo`` (launcher default 5000)
Other conventions put a different factor in front of ℓ; convert them once, at the config boundary:
    diffusers SD1.5 ``beta_dpo`` (logit β_dpo·ℓ, default 2500)  -> ``beta_from_diffusers(b)``            = 2b
    diffusers SDXL ``beta_dpo`` (logit −0.5·β_dpo·Δ, 5000)      -> ``beta_from_diffusers(b, "sdxl")``    = b
    Adaptive-DPO ``beta_dpo`` (logit β_dpo·ℓ, default 1000)     -> ``beta_from_adaptive_dpo(b)``         = 2b
    paper pseudo-code (β on the per-sample SUM of squares)      -> ``beta_from_sum_of_squares(b, C·H·W)`` = 2b·CHW

Loss types the trainer supports (``LOSS_TYPES``) and the functions that compute them:
    dpo           ``diffusion_dpo_loss`` on ε-MSE (Wallace et al. 2024, Eq. 14)
    adaptive-dpo  ``minority_metric`` (online u) -> ``combine_minority_scores`` (with an offline u) ->
                  ``adaptive_dpo_loss`` (= ``diffusion_dpo_loss`` with ``adaptive_weight`` and ``adaptive_margin``)
    balanced-dpo  ``balanced_dpo_loss`` (hard consensus label, or the vote-fraction soft target); the dynamic
                  reference update is the trainer's job
    ncp-dpo       ``epsilon_from_prediction`` (ε of a v-model) -> ``ddpm_reverse_step`` (policy, reference and
                  true ε, one shared z) -> frozen encoder at ``ncp_previous_timestep(t)`` ->
                  ``perceptual_distance`` -> ``ncp_dpo_loss``
    cpo           ``cpo_loss`` on ε-MSE or on perceptual distances (NCP-CPO)
    sft           ``sft_loss`` on the winner's ε-MSE or perceptual distance (NCP-SFT)
    ipo           ``ipo_loss`` (optionally with Adaptive-DPO weights)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


from prefcurate.data_schemas import adaptive
from prefcurate.data_schemas.adaptive import MarginType, USource, WeightType  # noqa: F401  (re-exported)
from prefcurate.data_schemas.vocab import LOSS_TYPES  # noqa: F401  (re-exported: the loss names)
from prefcurate.training.conventions import (  # noqa: F401  (re-exported: the β conventions)
    _check_positive, beta_from_adaptive_dpo, beta_from_diffusers, beta_from_sum_of_squares, dpo_logit_scale,
)

CombineMode = USource  # how combine_minority_scores merges the online and offline u

Metrics = dict[str, Tensor]


# ---------------------------------------------------------------- prediction targets (ε or v)

PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _signal_noise_scales(t: Tensor, alphas_cumprod: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t) for integer t (N,), shaped (N, 1, ..., 1) in ``like``'s dtype/device.

    The forward process is x_t = α_t·x_0 + σ_t·ε (Ho et al. 2020 Eq. 4), so α_t² + σ_t² = 1.
    """
    if t.dim() != 1 or t.shape[0] != like.shape[0] or t.is_floating_point():
        raise ValueError(f"t must be an integer tensor of shape ({like.shape[0]},), got {t.dtype} {tuple(t.shape)}")
    if alphas_cumprod.dim() != 1 or int(t.min()) < 0 or int(t.max()) >= alphas_cumprod.shape[0]:
        raise ValueError(f"t must index alphas_cumprod of shape (T,), got t in [{int(t.min())}, {int(t.max())}] "
                         f"and alphas_cumprod of shape {tuple(alphas_cumprod.shape)}")
    abar = alphas_cumprod.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))[
        t.to(like.device)]
    shape = (-1, *([1] * (like.dim() - 1)))
    return abar.sqrt().view(shape).to(like.dtype), (1 - abar).sqrt().view(shape).to(like.dtype)


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} (the scheduler config's "
                         f"prediction_type), got {prediction_type!r}")


def velocity(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """v = α_t·ε − σ_t·x_0 (Salimans & Ho 2022, arXiv 2202.00512, §4 / Appendix D), (N, ...) -> same.

    The same quantity as diffusers ``DDPMScheduler.get_velocity(x0, noise, t)``; SD2.x (768 px) is trained on it.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    a, s = _signal_noise_scales(t, alphas_cumprod, x0)
    return a * noise - s * x0


def prediction_target(prediction_type: PredictionType, x0: Tensor, noise: Tensor, t: Tensor,
                      alphas_cumprod: Tensor) -> Tensor:
    """What the UNet regresses onto, (N, ...): ε for ``epsilon`` (Ho et al. 2020 Eq. 14), v for
    ``v_prediction`` (Salimans & Ho 2022). Every ε-MSE loss of this module becomes a v-MSE with the v target,
    as in the diffusers Diffusion-DPO LoRA script; β keeps its meaning (a factor on mean-squared-error gaps)."""
    _check_prediction_type(prediction_type)
    return noise if prediction_type == "epsilon" else velocity(x0, noise, t, alphas_cumprod)


def epsilon_from_v(v: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """ε = α_t·v + σ_t·x_t: the noise a v-prediction implies (Salimans & Ho 2022 §4; substitute
    x_t = α_t·x_0 + σ_t·ε into v = α_t·ε − σ_t·x_0 and use α_t² + σ_t² = 1)."""
    a, s = _signal_noise_scales(t, alphas_cumprod, x_t)
    return a * v + s * x_t


def x0_from_v(v: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x̂_0 = α_t·x_t − σ_t·v: the clean latent a v-prediction implies (Salimans & Ho 2022 §4)."""
    a, s = _signal_noise_scales(t, alphas_cumprod, x_t)
    return a * x_t - s * v


def epsilon_from_prediction(prediction_type: PredictionType, pred: Tensor, x_t: Tensor, t: Tensor,
                            alphas_cumprod: Tensor) -> Tensor:
    """The ε a model output means: itself for ``epsilon``, ``epsilon_from_v`` for ``v_prediction``. NCP-DPO's
    reverse step (``ddpm_reverse_step``) takes ε; for a v-model it is the same posterior mean as the x_0 form
    μ = (√ᾱ_{t−1}·β_t·x̂_0 + √α_t·(1 − ᾱ_{t−1})·x_t)/(1 − ᾱ_t) with x̂_0 = ``x0_from_v`` (Ho et al. 2020 Eq. 7)."""
    _check_prediction_type(prediction_type)
    return pred if prediction_type == "epsilon" else epsilon_from_v(pred, x_t, t, alphas_cumprod)


# ---------------------------------------------------------------- per-sample errors

def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """(N, C, H, W) x2 -> (N,): mean squared error over every non-batch axis (Salesforce ``train.py``, §1.4).

    Computed in at least float32: DPO works on differences of about 1e-4 between these means, which
    half precision would round away.
    """
    if pred.shape != target.shape or pred.dim() < 2:
        raise ValueError(f"pred and target must have the same shape (N, ...), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1)


def split_winner_loser(batch: Tensor) -> tuple[Tensor, Tensor]:
    """(2B, ...) with the B winners first and the B losers second -> ((B, ...), (B, ...)) (§1.3)."""
    if batch.dim() < 1 or batch.shape[0] % 2:
        raise ValueError(f"expected a (2B, ...) winners-then-losers batch, got shape {tuple(batch.shape)}")
    winners, losers = batch.chunk(2, dim=0)
    return winners, losers


def _check_per_sample(**terms: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in terms.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or first[0] == 0 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected non-empty per-sample tensors, all of shape (B,), got {shapes}")


def _per_pair_constant(name: str, value: Tensor | float, like: Tensor) -> Tensor:
    """A weight / margin / target broadcast to (B,), detached: it shapes the loss, it is never trained."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device).detach()
    if value.dim() not in (0, 1) or (value.dim() == 1 and value.shape != like.shape):
        raise ValueError(f"{name} must be a scalar or of shape {tuple(like.shape)}, got {tuple(value.shape)}")
    return value.expand_as(like)


def _logit_metrics(z: Tensor) -> Metrics:
    """Implicit accuracy in the diffusers form (ties count half), reward margin mean z, and z itself."""
    z = z.detach()
    return {
        "implicit_acc": (z > 0).to(z.dtype).mean() + 0.5 * (z == 0).to(z.dtype).mean(),
        "reward_margin": z.mean(),
        "logits": z,
    }


# ---------------------------------------------------------------- Diffusion-DPO family

def dpo_raw_logits(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor) -> Tensor:
    """ℓ = (ē_ref,w − ē_ref,l) − (ē_θ,w − ē_θ,l), shape (B,): the diffusers/Adaptive-DPO ``logits`` before β.

    Positive when the policy improved on the winner more than on the loser. The reference terms are detached.
    """
    _check_per_sample(model_w=model_w, model_l=model_l, ref_w=ref_w, ref_l=ref_l)
    return (ref_w.detach() - ref_l.detach()) - (model_w - model_l)


def diffusion_dpo_loss(
    model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, *, beta: float,
    weight: Tensor | float | None = None, margin: Tensor | float | None = None,
    label_smoothing: Tensor | float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Diffusion-DPO, Wallace et al. CVPR 2024 (arXiv 2311.12908) Eq. 14, in the Salesforce convention:

        z_i = (β/2)·ℓ_i,   L = (1/B) Σ_i W_i·[−(1−ε_i)·log σ(z_i − Γ_i) − ε_i·log σ(−(z_i − Γ_i))]

    Inputs are per-sample mean errors (B,) of policy and reference on winners and losers; β is Salesforce
    ``beta_dpo`` (see the module docstring for the other conventions). W (per-pair weight) and Γ (margin, in
    logit units) default to 1 and 0; with them this is the Adaptive-DPO loss (arXiv 2503.16921, docs/methods.md §2.4).
    ε is the conservative-DPO soft target (Mitchell 2023, "A note on DPO with noisy preferences"): the
    probability that the label is wrong; ε = 0 is plain DPO. W, Γ and ε are detached.
    Metrics: implicit accuracy and reward margin of z (without Γ), per-sample z, raw policy/reference errors.
    """
    z = dpo_logit_scale(beta) * dpo_raw_logits(model_w, model_l, ref_w, ref_l)
    eps = _per_pair_constant("label_smoothing", label_smoothing, z)
    if isinstance(label_smoothing, Tensor):  # checking a tensor syncs with the device; a float costs nothing
        in_range = bool(((eps >= 0) & (eps <= 1)).all())
    else:
        in_range = 0 <= label_smoothing <= 1
    if not in_range:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    inside = z if margin is None else z - _per_pair_constant("margin", margin, z)
    per_pair = -(1 - eps) * F.logsigmoid(inside) - eps * F.logsigmoid(-inside)
    if weight is not None:
        per_pair = _per_pair_constant("weight", weight, z) * per_pair
    metrics = _logit_metrics(z)
    metrics["raw_model_loss"] = 0.5 * (model_w.detach().mean() + model_l.detach().mean())
    metrics["raw_ref_loss"] = 0.5 * (ref_w.detach().mean() + ref_l.detach().mean())
    return per_pair.mean(), metrics


def balanced_dpo_loss(
    model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, *, beta: float,
    winner_vote_fraction: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """BalancedDPO, Tamboli et al. arXiv 2503.12575 (design per docs/methods.md §3.3, code not public).

    Pairs arrive ordered by the scorers' majority vote. With ``winner_vote_fraction`` v̄ (B,) in [0, 1], the
    fraction of voters that preferred the ordered winner, the loss is the soft target
    −v̄·log σ(z) − (1−v̄)·log σ(−z), i.e. ``diffusion_dpo_loss`` with ε = 1 − v̄; without it, plain DPO.
    """
    if winner_vote_fraction is None:
        return diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=beta)
    loss, metrics = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=beta,
                                       label_smoothing=1.0 - winner_vote_fraction.detach())
    metrics["vote_fraction_mean"] = winner_vote_fraction.detach().mean()
    return loss, metrics


def ipo_loss(
    model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, *, beta_ipo: float,
    weight: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """IPO, Azar et al. 2023 (arXiv 2310.12036) Eq. 17: L = (1/B) Σ_i W_i·(ℓ_i − 1/(2·β_ipo))².

    IPO regresses the log-ratio difference itself (not β·ℓ) onto 1/(2τ), τ = ``beta_ipo``: its own
    hyperparameter, independent of the DPO β. This fixes the diffusers IPO branch, which read an undefined
    ``args.beta`` (PR #13522). ℓ is the mean-MSE difference (order 1e-4): rescaling ℓ by s is the same as
    using s·β_ipo and an s² larger learning rate, so β_ipo alone sets the target gap. W is detached.
    """
    _check_positive("beta_ipo", beta_ipo)
    ell = dpo_raw_logits(model_w, model_l, ref_w, ref_l)
    per_pair = (ell - 1.0 / (2.0 * beta_ipo)).pow(2)
    if weight is not None:
        per_pair = _per_pair_constant("weight", weight, ell) * per_pair
    return per_pair.mean(), _logit_metrics(ell)


def sft_loss(model_w: Tensor) -> tuple[Tensor, Metrics]:
    """SFT on winners only: mean of the winners' per-sample errors (Salesforce ``--sft``; NCP-SFT, arXiv
    2406.17636v2 §4.2). On ε-MSE of equal-size samples this equals ``F.mse_loss(pred_w, noise_w)``."""
    _check_per_sample(model_w=model_w)
    loss = model_w.mean()
    return loss, {"raw_model_loss": loss.detach()}


def cpo_loss(
    model_w: Tensor, model_l: Tensor, *, beta: float, sft_weight: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """Reference-free CPO, NCP-DPO paper (Gambashidze et al. arXiv 2406.17636v2) Eq. 19:

        z_i = −(β/2)·(e_w,i − e_l,i),   L = −(1/B) Σ_i log σ(z_i) + λ·(1/B) Σ_i e_w,i

    e is the per-sample ε-MSE (CPO) or the perceptual distance (NCP-CPO); β uses the module convention (the
    paper's βT is a separate hyperparameter from DPO's); λ = ``sft_weight``, default 1 as the NLL weight of
    CPO (Xu et al. 2024, arXiv 2401.08417, Eq. 6).
    """
    _check_per_sample(model_w=model_w, model_l=model_l)
    if sft_weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    z = -dpo_logit_scale(beta) * (model_w - model_l)
    preference = -F.logsigmoid(z).mean()
    sft = model_w.mean()
    metrics = _logit_metrics(z)
    metrics["preference_loss"] = preference.detach()
    metrics["raw_model_loss"] = sft.detach()
    return preference + sft_weight * sft, metrics


# ---------------------------------------------------------------- Adaptive-DPO

class MinorityMetric(NamedTuple):
    """Adaptive-DPO's minority-instance metric, each (B,) and detached (docs/methods.md §2.3)."""

    confidence: Tensor  # c: mean over annotators of σ(ρ·ℓ̂), confidence in the given label
    instability: Tensor  # v: min(unbiased std over annotators of ρ·ℓ̂, cap); 1 when there is one annotator
    u: Tensor  # (1 − c)·v in [0, 1]: high = likely minority / flipped pair


def minority_metric(
    annotator_logits: Tensor, *, rho: float = adaptive.RHO, normalize: bool = True, std_cap: float = adaptive.STD_CAP,
) -> MinorityMetric:
    """Adaptive-DPO minority-instance metric (Zhang et al. arXiv 2503.16921, Eqs. 11-13; code ``cal_un_wy_wstd``).

    ``annotator_logits`` (K, B): the raw logits ℓ of K "annotators" (official code: the current model and its
    EMA copies with decays 0.9999 and 0.5, K = 3). With ``normalize`` each annotator's ℓ is L2-normalised over
    the batch, ℓ̂ = ℓ/‖ℓ‖ (so u depends on B: record B with any u). s = ρ·ℓ̂; c = mean_k σ(s); v = min(std_k(s),
    std_cap), unbiased; u = (1 − c)·v. The README run uses ρ = 15 with normalisation; the code's ρ without
    normalisation is 1e4, since raw ℓ is about 1e-4. With K = 1 there is no spread: v = 1 and u = 1 − c, the
    code's no-EMA branch. Everything is computed from detached logits.
    """
    if annotator_logits.dim() != 2 or annotator_logits.numel() == 0:
        raise ValueError(f"annotator_logits must have shape (K, B), got {tuple(annotator_logits.shape)}")
    _check_positive("rho", rho)
    _check_positive("std_cap", std_cap)
    ell = annotator_logits.detach().to(torch.promote_types(annotator_logits.dtype, torch.float32))
    if normalize:  # per annotator, over the batch; an all-zero row stays zero
        ell = ell / ell.norm(dim=1, keepdim=True).clamp_min(torch.finfo(ell.dtype).tiny)
    s = rho * ell  # (K, B)
    confidence = torch.sigmoid(s).mean(dim=0)
    if s.shape[0] == 1:
        instability = torch.ones_like(confidence)
    else:
        instability = s.std(dim=0, correction=1).clamp(max=std_cap)
    return MinorityMetric(confidence, instability, (1.0 - confidence) * instability)


def combine_minority_scores(
    online_u: Tensor | None, offline_u: Tensor | None, mode: CombineMode = "online",
) -> Tensor:
    """One u (B,) in [0, 1] from the online metric and an offline one from the data snapshot.

    ``online`` (default) reproduces Adaptive-DPO: the model's own view. ``offline`` uses only the curated
    per-pair score, same meaning (high = likely minority): ``curation.labels.pair_metrics`` ``minority_score``, whose
    nulls (ties, < 2 annotators) the caller must fill. ``max`` down-weights a pair when either source flags it
    (conservative: label noise seen by one source is enough); ``mean`` averages the two.
    """
    needs_online, needs_offline = mode in ("online", "max", "mean"), mode in ("offline", "max", "mean")
    if mode not in adaptive.U_SOURCES:
        raise ValueError(f"mode must be one of {', '.join(adaptive.U_SOURCES)}, got {mode!r}")
    if (needs_online and online_u is None) or (needs_offline and offline_u is None):
        raise ValueError(f"mode {mode!r} needs online_u={needs_online} and offline_u={needs_offline}")
    given = {name: t.detach() for name, t in (("online_u", online_u), ("offline_u", offline_u)) if t is not None}
    _check_per_sample(**given)
    for name, t in given.items():
        if not bool(((t >= 0) & (t <= 1)).all()):  # also catches NaN (a null minority_score read as NaN)
            raise ValueError(f"{name} must lie in [0, 1] with no NaN")
    if mode == "online":
        return given["online_u"]
    if mode == "offline":
        return given["offline_u"]
    stacked = torch.stack([given["online_u"], given["offline_u"].to(given["online_u"])])  # (2, B)
    return stacked.amax(dim=0) if mode == "max" else stacked.mean(dim=0)


def adaptive_weight(u: Tensor, weight_type: WeightType = adaptive.WEIGHT_TYPE, k1: float = adaptive.K1,
                    c1: float = adaptive.C1) -> Tensor:
    """Adaptive-DPO instance weight W = 1 / ``prefcurate.data_schemas.adaptive.weight_denominator`` (arXiv 2503.16921
    reweighting term; code ``weight_type``), detached: linear 1/(k1·u + c1) (default); quadratic 1/(k1·u² + c1);
    sigmoid 1/(exp(k1·u) + c1); sqrt 1/(exp(k1·√u) + c1). Defaults from the README run (docs/methods.md §2.5).
    """
    denominator = adaptive.weight_denominator(u.detach(), weight_type, k1, c1)
    if bool((denominator <= 0).any()):
        raise ValueError(f"weight denominator must be > 0 (k1={k1}, c1={c1})")
    return 1.0 / denominator


def adaptive_margin(
    u: Tensor, raw_logits: Tensor, *, beta: float, margin_type: MarginType = adaptive.MARGIN_TYPE,
    margin_scale: float = adaptive.MARGIN_SCALE,
) -> Tensor:
    """Adaptive-DPO margin Γ (arXiv 2503.16921 Eq. 15; code ``use_margin``), detached, in logit units:

        Γ_i = −margin_scale · u_i^p / k + mean_j ℓ_j,   p = 2 (quadratic) or 1 (linear),   k = β/2

    k is the code's ``beta_dpo`` (see ``beta_from_adaptive_dpo``); ``raw_logits`` is the current model's ℓ.
    ``margin_scale = 1`` reproduces the code, where Γ (order 1e-4 to 1e-3) is negligible next to k·ℓ (order
    0.1-1) and the effect comes from W (docs/methods.md §2.4, scale caveat); ``margin_scale = k`` makes the u-term
    −u^p, of order one in logit units. The formula is ``prefcurate.data_schemas.adaptive.margin``, as in
    ``prefcurate.curation.labels.pair_metrics``.
    """
    _check_per_sample(u=u, raw_logits=raw_logits)
    return adaptive.margin(u.detach(), raw_logits.detach().mean(), beta_dpo=dpo_logit_scale(beta),
                           margin_type=margin_type, margin_scale=margin_scale)


def adaptive_dpo_loss(
    model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, u: Tensor, *, beta: float,
    use_weight: bool = True, weight_type: WeightType = adaptive.WEIGHT_TYPE, k1: float = adaptive.K1,
    c1: float = adaptive.C1, use_margin: bool = True, margin_type: MarginType = adaptive.MARGIN_TYPE,
    margin_scale: float = adaptive.MARGIN_SCALE,
) -> tuple[Tensor, Metrics]:
    """Adaptive-DPO, Zhang et al. arXiv 2503.16921 (code ``loss_type="sigmoid"`` with self-logit reweighting):

        L = −(1/B) Σ_i W_i · log σ(k·ℓ_i − Γ_i),   k = β/2

    In the code's convention this reads −mean W·log σ(beta_dpo·ℓ − Γ) with beta_dpo = k, so pass
    ``beta=beta_from_adaptive_dpo(1000)`` = 2000 for the README run. u (B,) comes from ``minority_metric``
    and/or ``combine_minority_scores`` (all zeros during the EMA warm-up). With ``use_weight`` and
    ``use_margin`` off this is exactly ``diffusion_dpo_loss``. W and Γ are detached.
    """
    _check_per_sample(u=u, model_w=model_w)
    raw_logits = dpo_raw_logits(model_w, model_l, ref_w, ref_l).detach()
    weight = adaptive_weight(u, weight_type, k1, c1) if use_weight else None
    margin = adaptive_margin(u, raw_logits, beta=beta, margin_type=margin_type,
                             margin_scale=margin_scale) if use_margin else None
    loss, metrics = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=beta, weight=weight, margin=margin)
    metrics["minority_u"] = u.detach().mean()
    metrics["weight_mean"] = weight.mean() if weight is not None else torch.ones_like(metrics["reward_margin"])
    metrics["margin_mean"] = margin.mean() if margin is not None else torch.zeros_like(metrics["reward_margin"])
    return loss, metrics


# ---------------------------------------------------------------- NCP-DPO

def ncp_previous_timestep(t: Tensor) -> Tensor:
    """t' = max(t, 1) − 1 (N,): the timestep at which the frozen encoder sees x_{t−1} (docs/methods.md §4.3)."""
    return t.clamp(min=1) - 1


def ddpm_reverse_step(x_t: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor, z: Tensor) -> Tensor:
    """One DDPM posterior step (Ho et al. 2020 Alg. 2; NCP-DPO arXiv 2406.17636v2 §4), (N, C, H, W) -> same:

        x_{t−1} = (x_t − (1 − α_t)/√(1 − ᾱ_t) · ε) / √α_t + σ_t·z,   α_t = ᾱ_t / ᾱ_{t−1},
        σ_t² = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · (1 − α_t)   (posterior variance β̃_t)

    t (N,) integer, clamped to ≥ 1 so that t − 1 is a valid index; ``alphas_cumprod`` (T,) is the scheduler's.
    Call it with ε_θ, ε_ref and the true ε and the same z: the policy and target then differ by
    −(1 − α_t)/(√α_t·√(1 − ᾱ_t))·(ε_θ − ε).
    """
    if x_t.dim() < 2 or eps.shape != x_t.shape or z.shape != x_t.shape:
        raise ValueError(f"x_t, eps and z must share one (N, ...) shape, got {tuple(x_t.shape)}, "
                         f"{tuple(eps.shape)}, {tuple(z.shape)}")
    if t.shape != x_t.shape[:1] or t.is_floating_point():
        raise ValueError(f"t must be an integer tensor of shape ({x_t.shape[0]},), got {t.dtype} {tuple(t.shape)}")
    if alphas_cumprod.dim() != 1 or int(t.max()) >= alphas_cumprod.shape[0] or int(t.min()) < 0:
        raise ValueError(f"t must index alphas_cumprod of shape (T,), got t in [{int(t.min())}, {int(t.max())}] "
                         f"and alphas_cumprod of shape {tuple(alphas_cumprod.shape)}")
    t = t.clamp(min=1).to(alphas_cumprod.device)
    abar_t, abar_prev = alphas_cumprod[t], alphas_cumprod[t - 1]  # (N,)
    alpha_t = abar_t / abar_prev
    sigma_t = ((1 - abar_prev) / (1 - abar_t) * (1 - alpha_t)).sqrt()
    eps_coef = (1 - alpha_t) / (1 - abar_t).sqrt()

    def per_sample(c: Tensor) -> Tensor:  # (N,) -> (N, 1, ..., 1) in x_t's dtype and device
        return c.to(device=x_t.device, dtype=x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))

    return (x_t - per_sample(eps_coef) * eps) / per_sample(alpha_t.sqrt()) + per_sample(sigma_t) * z


def perceptual_distance(f_pred: Tensor | Sequence[Tensor], f_target: Tensor | Sequence[Tensor]) -> Tensor:
    """NCP perceptual loss PL = ‖f(x_θ,t′) − f(x_t′)‖² (arXiv 2406.17636v2 Eqs. 13-17) as a per-sample MEAN
    over all feature elements, (N,), so the β convention of Diffusion-DPO carries over (docs/methods.md §4.3).

    Features are one (N, ...) tensor or a list of them (e.g. several down blocks), flattened and concatenated
    per sample, so each element counts once. Computed in at least float32.
    """
    preds = [f_pred] if isinstance(f_pred, Tensor) else list(f_pred)
    targets = [f_target] if isinstance(f_target, Tensor) else list(f_target)
    if not preds or len(preds) != len(targets):
        raise ValueError(f"f_pred and f_target must hold the same number of feature maps, got {len(preds)} "
                         f"and {len(targets)}")
    for p, q in zip(preds, targets, strict=True):
        if p.shape != q.shape or p.dim() < 1 or p.shape[0] != preds[0].shape[0]:
            raise ValueError(f"feature maps must pair up with one batch size, got {tuple(p.shape)} and "
                             f"{tuple(q.shape)}")
    dtype = torch.promote_types(preds[0].dtype, torch.float32)
    flat_pred = torch.cat([p.to(dtype).reshape(p.shape[0], -1) for p in preds], dim=1)  # (N, total elements)
    flat_target = torch.cat([q.to(dtype).reshape(q.shape[0], -1) for q in targets], dim=1)
    return (flat_pred - flat_target).pow(2).mean(dim=1)


def ncp_dpo_loss(
    pl_model_w: Tensor, pl_model_l: Tensor, pl_ref_w: Tensor, pl_ref_l: Tensor, *, beta: float,
) -> tuple[Tensor, Metrics]:
    """NCP-DPO, Gambashidze et al. arXiv 2406.17636v2 Eq. 18: ``diffusion_dpo_loss`` with the perceptual
    distances PL (``perceptual_distance`` after ``ddpm_reverse_step``) in place of the ε-MSE, same β convention."""
    return diffusion_dpo_loss(pl_model_w, pl_model_l, pl_ref_w, pl_ref_l, beta=beta)
