"""Adaptive-DPO's constants and its two per-pair formulas, written once (plain Python: no torch, no Polars).

Zhang et al., "When Preferences Diverge: Aligning Diffusion Models with Minority-Aware Adaptive DPO",
arXiv 2503.16921; official code `fanfanffff1/Adaptive-DPO`, `dpo_train_un.py`. For a pair with minority
score u in [0, 1] (Eq. 13, u = (1 - c) * v):

    W(u)     = 1 / (k1 * u + c1)                          Eq. 15 reweighting ("linear"; other forms below)
    Gamma(u) = -margin_scale * u^p / beta_dpo + offset    Eq. 15 adaptive margin, p = 2 ("quadratic") or 1,
                                                          used as -log sigmoid(beta_dpo * l - Gamma)

beta_dpo is the code's logit factor (logit = beta_dpo * l), i.e. half the project's canonical beta
(training.conventions: canonical beta = 2 * beta_dpo). The offline form (curation.labels.pair_metrics, Polars
expressions, offset 0 or a dataset mean) and the online form (training.losses, torch tensors, offset the batch
mean of the model's logits) both call `weight_denominator` and `margin`, so the two cannot drift apart. The
defaults are the official README run (SD1.5, train_batch_size 16).
"""
from __future__ import annotations

import typing
from typing import Any, Literal


WeightType = Literal["linear", "quadratic", "sigmoid", "sqrt"]
MarginType = Literal["quadratic", "linear"]
USource = Literal["online", "offline", "max", "mean"]
WEIGHT_TYPES: tuple[str, ...] = typing.get_args(WeightType)
MARGIN_TYPES: tuple[str, ...] = typing.get_args(MarginType)
# Where the trainer's u comes from: the online metric (the paper), the snapshot's offline minority_score, or both
# combined by max / mean (prefcurate.training.losses.combine_minority_scores).
U_SOURCES: tuple[str, ...] = typing.get_args(USource)

RHO = 15.0  # `logits_rho` with `use_logits_normalization=True`: s = rho * l_hat before the sigmoid
STD_CAP = 1.0  # `min(std, 1)` in `cal_un_wy_wstd`: keeps u in [0, 1]
K1 = 10.0  # `rewight_temparature`: how fast W falls with u (W = 1/11 at u = 1, linear)
C1 = 1.0  # `rewight_intercept`: W = 1/c1 at u = 0
WEIGHT_TYPE: WeightType = "linear"  # the code's default `weight_type`
MARGIN_TYPE: MarginType = "quadratic"  # the code's default margin: u^2 / beta_dpo
MARGIN_SCALE = 1.0  # this project's knob on Gamma's u-term; 1 reproduces the code (a margin of at most 1e-3)
BETA_DPO = 1000.0  # README `beta_dpo` (code convention); canonical beta 2000
REFERENCE_BATCH_SIZE = 16  # README `train_batch_size`: the batch over which the online logits are L2-normalised


def weight_denominator(u: Any, weight_type: str = WEIGHT_TYPE, k1: float = K1, c1: float = C1) -> Any:
    """The denominator of W(u) = 1 / denominator (code `weight_type`): linear k1*u + c1 (default), quadratic
    k1*u^2 + c1 (spelt `quardratic` in the code), sigmoid exp(k1*u) + c1, sqrt exp(k1*sqrt(u)) + c1.

    u: a torch Tensor or a Polars expression, anything with `**`, `.exp()` and `.sqrt()`; same type back.
    """
    if weight_type == "linear":
        return k1 * u + c1
    if weight_type == "quadratic":
        return k1 * u**2 + c1
    if weight_type == "sigmoid":
        return (k1 * u).exp() + c1
    if weight_type == "sqrt":
        return (k1 * u.sqrt()).exp() + c1
    raise ValueError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}, got {weight_type!r}")


def margin(u: Any, offset: Any, *, beta_dpo: float, margin_type: str = MARGIN_TYPE,
           margin_scale: float = MARGIN_SCALE) -> Any:
    """Gamma = -margin_scale * u^p / beta_dpo + offset (Eq. 15; p = 2 for "quadratic", 1 for "linear"), in logit
    units. u: a torch Tensor or a Polars expression; offset: a float or the same type as u (broadcast)."""
    if margin_type == "quadratic":
        term = u**2
    elif margin_type == "linear":
        term = u
    else:
        raise ValueError(f"margin_type must be one of {', '.join(MARGIN_TYPES)}, got {margin_type!r}")
    return -margin_scale * term / beta_dpo + offset


def manifest_record(pair_metrics: dict) -> dict:
    """The Adaptive-DPO constants a snapshot's offline weights and margins were computed with, for its manifest
    (``data_schemas.snapshot_contract``), from a ``curation.labels.pair_metrics.PairMetricsConfig`` as a dict.
    ``beta`` is the canonical β (2·beta_dpo) a trainer must use for the margins to mean what they meant here."""
    keys = ("rho", "reference_batch_size", "std_cap", "stability_term", "k1", "c1", "weight_type", "margin_type",
            "margin_scale", "margin_offset")
    return {**{k: pair_metrics[k] for k in keys if k in pair_metrics}, "beta_dpo": float(pair_metrics["beta"]),
            "beta": 2.0 * float(pair_metrics["beta"])}
