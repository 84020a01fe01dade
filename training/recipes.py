"""Paper recipes: the published hyperparameters of each method, every number with where it was published.

``--recipe NAME`` (``TrainConfig`` field ``recipe``) starts from the recipe's values; any flag given explicitly
on the command line overrides them, and ``train_config.json`` records the recipe's name, the fields that were
overridden and the values that ran. A number a paper or its official script does not publish is not set here:
the project default (``TrainConfig``) applies, and the recipe's ``not_published`` says so.

All values are in this project's conventions: β is canonical (Salesforce ``beta_dpo``, logit = β/2 · ℓ on the
mean-MSE difference; ``training.losses``), batch sizes are per device (pairs), the learning rate is the LoRA's.
The trainer trains LoRA adapters only, so a full-fine-tuning number (Diffusion-DPO's paper run: learning rate
2.048e-8 on all weights, 2048-pair batches) is named in the notes but not used; the LoRA recipe the
Diffusion-DPO authors' code base ships (diffusers ``examples/research_projects/diffusion_dpo``) is.
Memory options of those runs (8-bit Adam, xformers) are named in the notes and left to the user: bitsandbytes is
optional and CUDA-only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


DIFFUSERS_DPO = "diffusers examples/research_projects/diffusion_dpo/README.md"
SALESFORCE = "SalesforceAIResearch/DiffusionDPO"
ADAPTIVE = "fanfanffff1/Adaptive-DPO README run (dpo_train_un.py, config/config.py)"
NCP = "Gambashidze et al. arXiv 2406.17636v2 §6.1"


@dataclass(frozen=True)
class Setting:
    value: Any
    where: str  # the argument or sentence in the recipe's source that gives the value
    source: str | None = None  # another source than the recipe's own


@dataclass(frozen=True)
class Recipe:
    name: str
    loss: str
    summary: str
    source: str  # where most values come from
    settings: dict[str, Setting]
    not_published: tuple[str, ...] = ()  # fields the sources leave open: the project default applies
    notes: tuple[str, ...] = field(default=())

    def values(self) -> dict[str, Any]:
        return {"loss": self.loss} | {name: s.value for name, s in self.settings.items()}

    def help(self) -> str:
        parts = [f"{name}={s.value} ({s.source + ': ' if s.source else ''}{s.where})"
                 for name, s in self.settings.items()]
        text = f"{self.name}: {self.summary} [{self.source}]: " + ", ".join(parts)
        if self.not_published:
            text += "; not published, project default: " + ", ".join(self.not_published)
        return text + "".join(f"; {n}" for n in self.notes)


def _dpo_lora(batch: int, steps: int, checkpoint_every: int) -> dict[str, Setting]:
    """The diffusers Diffusion-DPO LoRA README commands (SD: train_diffusion_dpo.py, SDXL: ..._sdxl.py)."""
    return {
        "train_batch_size": Setting(batch, f"--train_batch_size={batch}"),
        "gradient_accumulation_steps": Setting(2, "--gradient_accumulation_steps=2"),
        "lora_rank": Setting(8, "--rank=8"),
        "learning_rate": Setting(1e-5, "--learning_rate=1e-5 --lr_scheduler=constant"),
        "lr_warmup_steps": Setting(0, "--lr_warmup_steps=0"),
        "max_steps": Setting(steps, f"--max_train_steps={steps}"),
        "checkpoint_every": Setting(checkpoint_every, f"--checkpointing_steps={checkpoint_every}"),
        "mixed_precision": Setting("fp16", "--mixed_precision=fp16"),
        "gradient_checkpointing": Setting(True, "--gradient_checkpointing"),
        "seed": Setting(0, "--seed=0"),
        "proportion_empty_prompts": Setting(0.2, "train.py --proportion_empty_prompts default 0.2", SALESFORCE),
    }


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        "diffusion-dpo-sd15", "dpo", "Diffusion-DPO (Wallace et al. CVPR 2024, arXiv 2311.12908) LoRA on SD1.5",
        f"{DIFFUSERS_DPO}, SD command",
        {**_dpo_lora(16, 10_000, 2000),
         "resolution": Setting(512, "--resolution=512"),
         "beta": Setting(5000.0, "train_diffusion_dpo.py --beta_dpo default 2500, logit without the 0.5 factor: "
                                 "= Salesforce beta_dpo 5000 as in launchers/sd15.sh")},
        notes=("the paper's full fine-tune (lr 2.048e-8, batch 2048 = 16 GPUs x 1 x 128, warm-up 500, 2000 "
               "steps) does not apply to a LoRA", "the README run also used --use_8bit_adam")),
    Recipe(
        "diffusion-dpo-sdxl", "dpo", "Diffusion-DPO LoRA on SDXL", f"{DIFFUSERS_DPO}, SDXL command",
        {**_dpo_lora(8, 2000, 500),
         "resolution": Setting(1024, "train_diffusion_dpo_sdxl.py --resolution default 1024"),
         "beta": Setting(5000.0, "train_diffusion_dpo_sdxl.py --beta_dpo default 5000 with the -0.5 factor "
                                 "(= Salesforce; the paper's final SDXL beta 5000)")},
        notes=("the README run also used --use_8bit_adam and the madebyollin/sdxl-vae-fp16-fix VAE",)),
    Recipe(
        "adaptive-dpo", "adaptive-dpo", "Adaptive-DPO (Zhang et al. arXiv 2503.16921) on SD1.5", ADAPTIVE,
        {"train_batch_size": Setting(16, "train_batch_size 16 (the rebuttal script: 64)"),
         "gradient_accumulation_steps": Setting(2, "gradient_accumulation_steps 2"),
         "lora_rank": Setting(8, "rank 8"),
         "learning_rate": Setting(1e-5, "learning_rate 1e-5, constant"),
         "lr_warmup_steps": Setting(0, "lr_warmup_steps 0"),
         "beta": Setting(2000.0, "beta_dpo 1000 with logit beta_dpo*l: canonical 2000"),
         "resolution": Setting(512, "resolution 512"),
         "mixed_precision": Setting("fp16", "mixed_precision fp16"),
         "gradient_checkpointing": Setting(True, "gradient_checkpointing"),
         "seed": Setting(0, "seed 0"),
         "u_source": Setting("online", "use_ema True: the model and 2 EMA annotators"),
         "rho": Setting(15.0, "logits_rho 15"),
         "normalize_logits": Setting(True, "use_logits_normalization True"),
         "k1": Setting(10.0, "rewight_temparature 10"),
         "c1": Setting(1.0, "rewight_intercept 1"),
         "weight_type": Setting("linear", "weight_type linear"),
         "use_weight": Setting(True, "use_self_logit_reweight True"),
         "use_margin": Setting(True, "use_margin True"),
         "margin_type": Setting("quadratic", "margin_type quadratic"),
         "ema_warmup_steps": Setting(2, "ema_warmup_steps 2"),
         "ema_decay_long": Setting(0.9999, "EMAModel decay 0.9999, hard-coded"),
         "ema_decay_short": Setting(0.5, "EMAModel decay 0.5, hard-coded")},
        not_published=("max_steps (the run is 1 epoch)", "proportion_empty_prompts")),
    Recipe(
        "ncp-dpo", "ncp-dpo", "NCP-DPO (Gambashidze et al. arXiv 2406.17636v2) on SD1.5", NCP,
        {"lora_rank": Setting(64, "LoRA rank 64 for all models"),
         "beta": Setting(5000.0, "'hyperparameters exactly like in the original Diffusion-DPO paper': "
                                 "launchers/sd15.sh beta_dpo 5000"),
         "lr_warmup_steps": Setting(500, "as Diffusion-DPO: launchers/sd15.sh --lr_warmup_steps 500"),
         "max_steps": Setting(2000, "as Diffusion-DPO: launchers/sd15.sh --max_train_steps 2000"),
         "train_batch_size": Setting(1, "as Diffusion-DPO: launchers/sd15.sh --train_batch_size 1"),
         "gradient_accumulation_steps": Setting(128, "as Diffusion-DPO: launchers/sd15.sh "
                                                     "--gradient_accumulation_steps 128 on each of 16 GPUs"),
         "proportion_empty_prompts": Setting(0.2, "train.py --proportion_empty_prompts default 0.2", SALESFORCE),
         "resolution": Setting(512, "as Diffusion-DPO SD1.5: 512 px")},
        not_published=("learning_rate (Diffusion-DPO's 2.048e-8 is for full fine-tuning of all weights)",
                       "ncp_encoder_tap"),
        notes=("the paper used 8-bit AdamW with default hyperparameters (--use-8bit-adam)",
               "on N GPUs the effective batch is 128*N pairs: --gradient-accumulation-steps 2048/N gives the "
               "paper's 2048")),
    Recipe(
        "balanced-dpo", "balanced-dpo",
        "BalancedDPO (Tamboli et al. arXiv 2503.12575): scorer-consensus labels and a dynamic reference",
        "arXiv 2503.12575 v2 abstract",
        {"beta": Setting(5000.0, "the Diffusion-DPO loss on consensus labels: launchers/sd15.sh beta_dpo 5000",
                         SALESFORCE)},
        not_published=("every other hyperparameter, including the reference-update rule ref_update_every / "
                       "ref_ema_tau: the official code was not accessible",)),
)}


def recipe_help() -> str:
    return " | ".join(r.help() for r in RECIPES.values())


def apply_recipe(name: str | None, explicit: dict[str, Any]) -> dict[str, Any]:
    """Field values of a config: the recipe's, then every explicitly given value on top. ``explicit`` holds only
    what the user gave (argv flags or keyword arguments). Refuses an unknown recipe, or an explicit loss that is
    not the recipe's (its hyperparameters would mean something else)."""
    if name is None:
        return dict(explicit)
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    if explicit.get("loss", recipe.loss) != recipe.loss:
        raise ValueError(f"recipe {name} is for --loss {recipe.loss}, got --loss {explicit['loss']}")
    values = recipe.values() | dict(explicit)
    values["recipe"] = name
    values["recipe_overrides"] = tuple(sorted(k for k in explicit if k in recipe.values() and k != "loss"))
    return values
