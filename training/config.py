"""``TrainConfig``: every training hyperparameter, typed, with a default that says why, and its argv parser.

β is always in the canonical convention of ``training.losses`` (Salesforce ``beta_dpo``: logit = β/2·ℓ on the
mean-MSE difference). Leave ``beta`` unset to get the per-loss default of ``DEFAULT_BETA``.
Booleans are real booleans and parse with ``--flag / --no-flag`` (the Adaptive-DPO script's ``type=bool``
flags read ``--use_margin=False`` as True).
``--recipe NAME`` starts from a paper's published hyperparameters (``training.recipes``); explicit flags override
them. From Python: ``TrainConfig.from_recipe(NAME, snapshot=..., ...)``.
"""
from __future__ import annotations

import argparse
import importlib.util
import typing
import warnings
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from prefcurate.data_schemas import adaptive
from prefcurate.data_schemas.adaptive import MarginType, USource, WeightType
from prefcurate.data_schemas.vocab import LOSS_TYPES
from prefcurate.training.conventions import beta_from_adaptive_dpo
from prefcurate.training.recipes import RECIPES, apply_recipe, recipe_help


LossType = Literal[LOSS_TYPES]  # Literal of a tuple = Literal of its items

DEFAULT_BETA = {
    "dpo": 5000.0,  # Salesforce launchers (docs/methods.md §1.5); = diffusers SD1.5 beta_dpo 2500
    "adaptive-dpo": beta_from_adaptive_dpo(adaptive.BETA_DPO),  # Adaptive-DPO README beta_dpo 1000 -> 2000 (§2.5)
    "balanced-dpo": 5000.0,  # the Diffusion-DPO loss on consensus labels (§3.3)
    "ncp-dpo": 5000.0,  # "hyperparameters exactly like in the original Diffusion-DPO paper" (§4.4)
    "cpo": 5000.0,  # same scale as DPO: the paper's βT for NCP-CPO is not published
    "sft": 5000.0,  # unused by SFT; kept so every loss has a value
    "ipo": 5000.0,  # unused by IPO (see beta_ipo)
}


# Adaptive-DPO's online metric L2-normalises each annotator's logits over the per-device batch: at batch 1 every
# normalised logit is ±1, so s = ±ρ and when the three annotators agree in sign the spread v is 0 and u = 0,
# also when all of them reject the label (the very pair u should flag). Refused below ADAPTIVE_MIN_BATCH; warned
# below the official README run's per-device batch (train_batch_size 16), where u is coarser than published.
ADAPTIVE_MIN_BATCH = 2
ADAPTIVE_RECIPE_BATCH = adaptive.REFERENCE_BATCH_SIZE


def _f(default, help: str, **kw):  # noqa: A002 - "help" mirrors argparse
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _required(help: str):  # noqa: A002
    return field(metadata={"help": help, "required": True})


@dataclass
class TrainConfig:
    # ---- inputs and outputs
    snapshot: str = _required("training snapshot folder (manifest.json + shards), written by curation")
    model: str = _required("local diffusers pipeline folder (SD1.5/SD2.1/SDXL layout); nothing is downloaded")
    output: str = _required("output folder: metrics.jsonl, checkpoints/, the final LoRA weights")
    resume_from: str | None = _f(None, "checkpoint folder to resume from, or 'latest' for the newest in output")
    overwrite_output: bool = _f(False, "start afresh in an output folder that holds an earlier run (its metrics, "
                                       "checkpoints, logs, validation images and LoRA are removed first); "
                                       "without it such a folder is refused")
    recipe: str | None = _f(None, "start from a paper's published hyperparameters; explicit flags override them. "
                                  + recipe_help(), choices=list(RECIPES))
    recipe_overrides: tuple[str, ...] | None = _f(None, "recipe fields that explicit values overrode (recorded "
                                                        "in train_config.json)", cli=False)
    # ---- loss
    loss: LossType = _f("dpo", "loss type, one of prefcurate.training.losses.LOSS_TYPES")
    beta: float | None = _f(None, "canonical β (Salesforce beta_dpo); default per loss: dpo 5000, adaptive-dpo "
                                  "2000 (= its beta_dpo 1000)")
    beta_ipo: float = _f(100.0, "IPO τ: target ℓ gap 1/(2τ) (Adaptive-DPO --beta default)")
    cpo_lambda: float = _f(1.0, "CPO's SFT weight λ (NCP-DPO Eq. 19; Xu et al. NLL weight 1)")
    perceptual: bool = _f(False, "cpo/sft on the NCP perceptual distance instead of ε-MSE (NCP-CPO / NCP-SFT); "
                                 "ncp-dpo always uses it")
    use_snapshot_weights: bool = _f(True, "dpo/ipo: multiply each pair's loss by the snapshot's curated weight, "
                                          "and (dpo) subtract its margin; 1/0 in a plain snapshot")
    # ---- optimisation
    learning_rate: float = _f(1e-5, "AdamW LR; diffusers LoRA DPO README run and Adaptive-DPO README (1e-5)")
    lr_warmup_steps: int = _f(0, "linear warm-up steps, then constant (Adaptive-DPO: 0)")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay, as every public DPO script")
    adam_beta1: float = _f(0.9, "AdamW β1, as every public DPO script")
    adam_beta2: float = _f(0.999, "AdamW β2, as every public DPO script")
    adam_epsilon: float = _f(1e-8, "AdamW ε, as every public DPO script")
    max_grad_norm: float = _f(1.0, "gradient-norm clip (Salesforce SD1.5, diffusers); 0 disables")
    use_8bit_adam: bool = _f(False, "bitsandbytes 8-bit AdamW (NCP-DPO §6.1); needs bitsandbytes installed")
    max_steps: int = _f(2000, "optimiser steps (Salesforce launchers: 2000)")
    train_batch_size: int | None = _f(None, "pairs per device per micro-step; default per loss: adaptive-dpo 16 "
                                            "(its online metric normalises over the batch; official README run), "
                                            "others 1 (Salesforce: 1 on each of 16 GPUs)")
    gradient_accumulation_steps: int = _f(1, "micro-steps per optimiser step (Salesforce: 128; README LoRA: 1-2)")
    seed: int = _f(0, "seeds data order, noise, timesteps, prompt dropout (Adaptive-DPO README: 0)")
    # ---- model and memory
    lora_rank: int = _f(8, "LoRA rank (diffusers and Adaptive-DPO README runs: 8; NCP-DPO: 64)")
    lora_alpha: float | None = _f(None, "LoRA alpha; default = rank (scale 1), as the diffusers DPO script")
    lora_target_modules: tuple[str, ...] = _f(("to_q", "to_k", "to_v", "to_out.0"),
                                              "attention projections that get LoRA (diffusers DPO script)")
    resolution: int | None = _f(None, "training resolution in pixels; default the model's own: UNet sample_size x "
                                      "VAE scale factor (SD1.5 512, SD2.1 768, SDXL 1024)")
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "frozen weights in fp16/bf16 under autocast; bf16 "
                                                              "also on the CPU, fp16 (with loss scaling) on CUDA "
                                                              "only; LoRA weights stay fp32")
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in backward: less memory, ~30% slower")
    proportion_empty_prompts: float = _f(0.2, "share of captions replaced by '' (Diffusion-DPO default 0.2)")
    latent_cache: bool = _f(True, "encode every image and caption once per snapshot and model, so steps skip "
                                  "the VAE and the text encoder")
    cache_dir: str | None = _f(None, "latent cache root; default <output>/latent_cache")
    buffer_rows: int = _f(256, "shuffle buffer in rows: the snapshot is never loaded whole")
    checkpoint_every: int = _f(500, "optimiser steps between resumable checkpoints (Salesforce SD1.5: 500)")
    # ---- tracking and validation
    report_to: Literal["tensorboard", "wandb", "all", "none"] = _f(
        "tensorboard", "trackers for the step metrics: TensorBoard event files in <output>/logs, W&B, both, or none")
    validation_prompts: tuple[str, ...] = _f((), "captions rendered every --validation-every steps into "
                                                 "<output>/validation/step-N/ (one fixed seed per prompt)")
    validation_every: int = _f(100, "optimiser steps between validation images (and once at the end)")
    validation_inference_steps: int = _f(20, "DDIM steps per validation image")
    # ---- test hook
    debug_nonfinite_step: int = _f(0, "TEST HOOK: make the loss NaN at this optimiser step (1-based) on "
                                      "--debug-nonfinite-rank; 0 = off")
    debug_nonfinite_rank: int = _f(0, "TEST HOOK: the rank whose loss --debug-nonfinite-step makes NaN")
    # ---- Adaptive-DPO (docs/methods.md §2)
    u_source: USource = _f(
        "online", "minority score u: online (model + 2 EMA annotators, the paper), offline (snapshot "
                  "minority_score), or combined by max / mean")
    rho: float = _f(adaptive.RHO, "ρ on the L2-normalised logits (README run logits_rho 15)")
    normalize_logits: bool = _f(True, "L2-normalise each annotator's logits over the batch (README run)")
    k1: float = _f(adaptive.K1, "weight temperature k1 in W = 1/(k1·u + c1) (rewight_temparature 10)")
    c1: float = _f(adaptive.C1, "weight intercept c1 (rewight_intercept 1)")
    weight_type: WeightType = _f(adaptive.WEIGHT_TYPE, "W(u) form (code default)")
    use_weight: bool = _f(True, "apply W(u) (use_self_logit_reweight True in the README run)")
    use_margin: bool = _f(True, "apply the adaptive margin Γ (README run use_margin True)")
    margin_type: MarginType = _f(adaptive.MARGIN_TYPE, "Γ's u-term: u² (code default) or u")
    margin_scale: float = _f(adaptive.MARGIN_SCALE,
                             "scales Γ's u-term; 1 reproduces the code (negligible margin, docs/methods.md §2.4)")
    ema_decay_long: float = _f(0.9999, "decay of the long-horizon EMA annotator (hard-coded in the code)")
    ema_decay_short: float = _f(0.5, "decay of the short-horizon EMA annotator (hard-coded in the code)")
    ema_warmup_steps: int = _f(2, "u = 0 before this many optimiser steps (ema_warmup_steps 2)")
    # ---- BalancedDPO (docs/methods.md §3.3)
    ref_update_every: int = _f(100, "hard-copy the policy LoRA into the reference adapter every K optimiser "
                                     "steps; 0 = never (plain Diffusion-DPO reference)")
    ref_ema_tau: float = _f(0.0, "if > 0: reference ← τ·reference + (1−τ)·policy after every step instead")
    balanced_soft_target: bool = _f(False, "soft target from the snapshot's vote_fraction (label-smoothed DPO)")
    # ---- NCP-DPO (docs/methods.md §4)
    ncp_encoder_tap: Literal["last_down", "mid", "all_down"] = _f(
        "last_down", "perceptual features: last down block output, mid block output, or all down blocks")

    def __post_init__(self) -> None:
        if self.train_batch_size is None:
            self.train_batch_size = ADAPTIVE_RECIPE_BATCH if self.needs_online_u else 1
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.loss] if self.loss in DEFAULT_BETA else None
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        self.lora_target_modules = tuple(self.lora_target_modules)
        self.validation_prompts = tuple(self.validation_prompts)
        checks = {
            "loss": self.loss in LOSS_TYPES,
            "snapshot": bool(self.snapshot), "model": bool(self.model), "output": bool(self.output),
            "beta": self.beta is not None and self.beta > 0, "beta_ipo": self.beta_ipo > 0,
            "cpo_lambda": self.cpo_lambda >= 0, "learning_rate": self.learning_rate > 0,
            "lr_warmup_steps": self.lr_warmup_steps >= 0, "max_grad_norm": self.max_grad_norm >= 0,
            "max_steps": self.max_steps >= 1, "train_batch_size": self.train_batch_size >= 1,
            "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
            "lora_rank": self.lora_rank >= 1, "lora_alpha": self.lora_alpha > 0,
            "lora_target_modules": len(self.lora_target_modules) > 0,
            "resolution": self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
            "mixed_precision": self.mixed_precision in ("no", "fp16", "bf16"),
            "proportion_empty_prompts": 0.0 <= self.proportion_empty_prompts <= 1.0,
            "buffer_rows": self.buffer_rows >= 1, "checkpoint_every": self.checkpoint_every >= 1,
            "validation_every": self.validation_every >= 1,
            "validation_inference_steps": self.validation_inference_steps >= 1,
            "debug_nonfinite_step": self.debug_nonfinite_step >= 0,
            "debug_nonfinite_rank": self.debug_nonfinite_rank >= 0,
            "u_source": self.u_source in adaptive.U_SOURCES,
            "rho": self.rho > 0, "c1": self.c1 > 0, "k1": self.k1 >= 0,
            "weight_type": self.weight_type in adaptive.WEIGHT_TYPES,
            "margin_type": self.margin_type in adaptive.MARGIN_TYPES,
            "ema_decay_long": 0.0 <= self.ema_decay_long < 1.0, "ema_decay_short": 0.0 <= self.ema_decay_short < 1.0,
            "ema_warmup_steps": self.ema_warmup_steps >= 0, "ref_update_every": self.ref_update_every >= 0,
            "ref_ema_tau": 0.0 <= self.ref_ema_tau < 1.0,
            "ncp_encoder_tap": self.ncp_encoder_tap in ("last_down", "mid", "all_down"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid TrainConfig field(s): " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))
        if self.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("use_8bit_adam=True needs bitsandbytes: pip install bitsandbytes (CUDA only)")
        if self.recipe is not None and self.recipe_overrides is None:
            raise ValueError(f"TrainConfig(recipe={self.recipe!r}) alone applies no recipe: use "
                             f"TrainConfig.from_recipe({self.recipe!r}, ...) or --recipe on the command line")
        if self.needs_online_u and self.normalize_logits:
            if self.train_batch_size < ADAPTIVE_MIN_BATCH:
                raise ValueError(f"adaptive-dpo with the online metric needs train_batch_size >= "
                                 f"{ADAPTIVE_MIN_BATCH} per device (got {self.train_batch_size}): at batch 1 the "
                                 f"batch-normalised logits are ±1 and u = 0 whenever the annotators agree, even "
                                 f"when they all reject the label; use a larger batch, --no-normalize-logits, "
                                 f"or --u-source offline")
            if self.train_batch_size < ADAPTIVE_RECIPE_BATCH:
                warnings.warn(f"adaptive-dpo: the online metric u is normalised over the per-device batch; "
                              f"train_batch_size {self.train_batch_size} < {ADAPTIVE_RECIPE_BATCH} (the official "
                              f"README run) gives a coarser u than published", UserWarning, stacklevel=3)

    @classmethod
    def from_recipe(cls, recipe: str | None, **explicit: Any) -> TrainConfig:
        """The recipe's values (``training.recipes``), then ``explicit`` on top; ``recipe=None``: no recipe."""
        values = apply_recipe(recipe, explicit)
        values.setdefault("recipe_overrides", None if recipe is None else ())
        return cls(**values)

    @property
    def needs_online_u(self) -> bool:
        return self.loss == "adaptive-dpo" and self.u_source != "offline"

    @property
    def uses_perceptual(self) -> bool:
        return self.loss == "ncp-dpo" or (self.perceptual and self.loss in ("cpo", "sft"))


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """One ``--kebab-case`` flag per field; bools are ``--x / --no-x``; Literals become choices.
    ``defaults=False``: absent flags are absent from the namespace (which flags were given explicitly)."""
    parser = argparse.ArgumentParser(prog="python -m prefcurate.training.trainer", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        help_text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help: "30% s" printed a dict
        flag, kind, kw = "--" + f.name.replace("_", "-"), hints[f.name], {"help": help_text}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.metadata.get("required"):
            kw["required"] = True
        elif not defaults:
            kw["default"] = argparse.SUPPRESS
        else:
            kw["default"] = f.default if f.default is not MISSING else f.default_factory()
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kw["choices"] = list(args)
        elif typing.get_origin(kind) is tuple:
            kw["nargs"] = "+"
        else:
            kw["type"] = args[0] if args else kind
        parser.add_argument(flag, **kw)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """argv -> config: the recipe's values (``--recipe``), then every flag given explicitly."""
    build_parser().parse_args(argv)  # --help, usage errors
    explicit = vars(build_parser(defaults=False).parse_args(argv))
    return TrainConfig.from_recipe(explicit.pop("recipe", None), **explicit)
