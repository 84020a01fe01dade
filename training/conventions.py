"""β conventions: plain Python, no torch, so that `--help` and input checks stay fast (the loss names and the
Adaptive-DPO types are in prefcurate.data_schemas.vocab and prefcurate.data_schemas.adaptive).

One β convention throughout (see training/losses.py): the logit is z = (β/2)·[(e_ref,w − e_ref,l) − (e_θ,w − e_θ,l)]
on per-sample mean squared errors, β being the Salesforce DiffusionDPO ``beta_dpo``. The functions below
convert the other published conventions into it.
"""
from __future__ import annotations

from typing import Literal


# ---------------------------------------------------------------- β conventions

def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def dpo_logit_scale(beta: float) -> float:
    """k = β/2: the factor on ℓ = Δ_ref − Δ_θ (mean-MSE) inside the sigmoid; β is Salesforce ``beta_dpo``.

    Salesforce ``train.py``: ``inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)`` (docs/methods.md §1.4).
    """
    _check_positive("beta", beta)
    return 0.5 * beta


def beta_from_diffusers(beta_dpo: float, script: Literal["sd15", "sdxl"] = "sd15") -> float:
    """Canonical β from the diffusers ``--beta_dpo`` (docs/methods.md §1.6-1.7).

    ``train_diffusion_dpo.py`` (SD1.5) uses logit ``beta_dpo * ℓ`` (no 0.5), so β = 2·beta_dpo (2500 -> 5000);
    ``train_diffusion_dpo_sdxl.py`` uses ``-0.5 * beta_dpo`` like Salesforce, so β = beta_dpo.
    """
    _check_positive("beta_dpo", beta_dpo)
    if script == "sd15":
        return 2.0 * beta_dpo
    if script == "sdxl":
        return float(beta_dpo)
    raise ValueError(f"script must be 'sd15' or 'sdxl', got {script!r}")


def beta_from_adaptive_dpo(beta_dpo: float) -> float:
    """Canonical β from Adaptive-DPO's ``--beta_dpo`` (logit ``beta_dpo * ℓ``, docs/methods.md §2.2):
    β = 2·beta_dpo."""
    _check_positive("beta_dpo", beta_dpo)
    return 2.0 * beta_dpo


def beta_from_sum_of_squares(beta: float, elements_per_sample: int) -> float:
    """Canonical β from a β applied to the per-sample SUM of squares (Wallace et al. pseudo-code,
    docs/methods.md §1.1).

    sum = C·H·W · mean and that logit has no 0.5 factor, so k = β·C·H·W and the canonical β is 2·β·C·H·W.
    """
    _check_positive("beta", beta)
    if elements_per_sample < 1:
        raise ValueError(f"elements_per_sample must be >= 1, got {elements_per_sample}")
    return 2.0 * beta * elements_per_sample
