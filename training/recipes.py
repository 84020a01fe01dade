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
ADAPTIVE = "fanfanffff1/Adaptive-DPO README run (dpo_train_un.py, config/config.py)"
NCP = "Gambashidze et al. arXiv 2406.17636v2 §6.1"


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # paper section / table, or official script and its argument


@dataclass(frozen=True)
class Recipe:
    name: str
    loss: str
    summary: str
    settings: dict[str, Setting]
    not_published: tuple[str, ...] = ()  # fields the sources leave open: the project default applies
    notes: tuple[str, ...] = field(default=())

    def values(self) -> dict[str, Any]:
        return {"loss": self.loss} | {name: s.value for name, s in self.settings.items()}

    def help(self) -> str:
        parts = [f"{name}={s.value} ({s.source})" for name, s in self.settings.items()]
        text = f"{self.name}: {self.summary}; " + ", ".join(parts)
        if self.not_published:
            text += "; not published, project default: " + ", ".join(self.not_published)
        return text + "".join(f"; {n}" for n in self.notes)


def _dpo_lora(script: str, batch: int, steps: int, resolution: int) -> dict[str, Setting]:
    """The diffusers Diffusion-DPO LoRA README command (SD: train_diffusion_dpo.py, SDXL: ..._sdxl.py)."""
    src = f"{DIFFUSERS_DPO}, {script} command"
    return {
        "train_batch_size": Setting(batch, f"{src}: --train_batch_size={batch}"),
        "gradient_accumulation_steps": Setting(2, f"{src}: --gradient_accumulation_steps=2"),
        "lora_rank": Setting(8, f"{src}: --rank=8"),
        "learning_rate": Setting(1e-5, f"{src}: --learning_rate=1e-5, --lr_scheduler=constant"),
        "lr_warmup_steps": Setting(0, f"{src}: --lr_warmup_steps=0"),
        "max_steps": Setting(steps, f"{src}: --max_train_steps={steps}"),
        "resolution": Setting(resolution, f"{src}: --resolution {resolution}"),
        "mixed_precision": Setting("fp16", f"{src}: --mixed_precision=fp16"),
        "gradient_checkpointing": Setting(True, f"{src}: --gradient_checkpointing"),
        "seed": Setting(0, f"{src}: --seed=0"),
    }


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        "diffusion-dpo-sd15", "dpo",
        "Diffusion-DPO (Wallace et al. CVPR 2024, arXiv 2311.12908) LoRA on SD1.5",
        {**_dpo_lora("SD", 16, 10_000, 512),
         "checkpoint_every": Setting(2000, f"{DIFFUSERS_DPO}, SD command: --checkpointing_steps=2000"),
         "beta": Setting(5000.0, "train_diffusion_dpo.py --beta_dpo default 2500 without the 0.5 factor = "
                                 "Salesforce beta_dpo 5000 (launchers/sd15.sh)"),
         "proportion_empty_prompts": Setting(0.2, "SalesforceAIResearch/DiffusionDPO train.py "
                                                  "--proportion_empty_prompts default 0.2")},
        notes=("the paper's full fine-tune (lr 2.048e-8, batch 2048 = 16 GPUs x 1 x 128, warm-up 500, 2000 "
               "steps) does not apply to a LoRA", "the README run also used --use_8bit_adam")),
    Recipe(
        "diffusion-dpo-sdxl", "dpo",
        "Diffusion-DPO LoRA on SDXL",
        {**_dpo_lora("SDXL", 8, 2000, 1024),
         "beta": Setting(5000.0, "train_diffusion_dpo_sdxl.py --beta_dpo default 5000 with the -0.5 factor "
                                 "(= Salesforce; paper final SDXL beta 5000)"),
         "proportion_empty_prompts": Setting(0.2, "SalesforceAIResearch/DiffusionDPO train.py "
                                                  "--proportion_empty_prompts default 0.2")},
        not_published=("checkpoint_every",),
        notes=("the README run also used --use_8bit_adam and the madebyollin/sdxl-vae-fp16-fix VAE",)),
    Recipe(
        "adaptive-dpo", "adaptive-dpo",
        "Adaptive-DPO (Zhang et al. arXiv 2503.16921) on SD1.5",
        {"train_batch_size": Setting(16, f"{ADAPTIVE}: train_batch_size 16 (rebuttal script 64)"),
         "gradient_accumulation_steps": Setting(2, f"{ADAPTIVE}: gradient_accumulation_steps 2"),
         "lora_rank": Setting(8, f"{ADAPTIVE}: rank 8"),
         "learning_rate": Setting(1e-5, f"{ADAPTIVE}: learning_rate 1e-5, constant"),
         "lr_warmup_steps": Setting(0, f"{ADAPTIVE}: lr_warmup_steps 0"),
         "beta": Setting(2000.0, f"{ADAPTIVE}: beta_dpo 1000 (logit beta_dpo*l) = canonical 2000"),
         "resolution": Setting(512, f"{ADAPTIVE}: resolution 512"),
         "mixed_precision": Setting("fp16", f"{ADAPTIVE}: mixed_precision fp16"),
         "gradient_checkpointing": Setting(True, f"{ADAPTIVE}: gradient_checkpointing"),
         "seed": Setting(0, f"{ADAPTIVE}: seed 0"),
         "u_source": Setting("online", f"{ADAPTIVE}: use_ema True (model + 2 EMA annotators)"),
         "rho": Setting(15.0, f"{ADAPTIVE}: logits_rho 15"),
         "normalize_logits": Setting(True, f"{ADAPTIVE}: use_logits_normalization True"),
         "k1": Setting(10.0, f"{ADAPTIVE}: rewight_temparature 10"),
         "c1": Setting(1.0, f"{ADAPTIVE}: rewight_intercept 1"),
         "weight_type": Setting("linear", f"{ADAPTIVE}: weight_type linear"),
         "use_weight": Setting(True, f"{ADAPTIVE}: use_self_logit_reweight True"),
         "use_margin": Setting(True, f"{ADAPTIVE}: use_margin True"),
         "margin_type": Setting("quadratic", f"{ADAPTIVE}: margin_type quadratic"),
         "ema_warmup_steps": Setting(2, f"{ADAPTIVE}: ema_warmup_steps 2"),
         "ema_decay_long": Setting(0.9999, f"{ADAPTIVE}: EMAModel decay 0.9999 (hard-coded)"),
         "ema_decay_short": Setting(0.5, f"{ADAPTIVE}: EMAModel decay 0.5 (hard-coded)")},
        not_published=("max_steps (the run is 1 epoch)", "proportion_empty_prompts")),
    Recipe(
        "ncp-dpo", "ncp-dpo",
        "NCP-DPO (Gambashidze et al. arXiv 2406.17636v2) on SD1.5",
        {"lora_rank": Setting(64, f"{NCP}: LoRA rank 64 for all models"),
         "beta": Setting(5000.0, f"{NCP}: 'hyperparameters exactly like in the original Diffusion-DPO paper' "
                                 "(Salesforce launchers beta_dpo 5000)"),
         "lr_warmup_steps": Setting(500, f"{NCP}: as Diffusion-DPO (launchers/sd15.sh --lr_warmup_steps 500)"),
         "max_steps": Setting(2000, f"{NCP}: as Diffusion-DPO (launchers/sd15.sh --max_train_steps 2000)"),
         "train_batch_size": Setting(1, f"{NCP}: as Diffusion-DPO (launchers/sd15.sh --train_batch_size 1)"),
         "gradient_accumulation_steps": Setting(128, f"{NCP}: as Diffusion-DPO (launchers/sd15.sh "
                                                     "--gradient_accumulation_steps 128, on each of 16 GPUs)"),
         "proportion_empty_prompts": Setting(0.2, "SalesforceAIResearch/DiffusionDPO train.py default 0.2"),
         "resolution": Setting(512, "Diffusion-DPO SD1.5 resolution 512")},
        not_published=("learning_rate (Diffusion-DPO's 2.048e-8 is for full fine-tuning of all weights)",
                       "ncp_encoder_tap"),
        notes=("the paper used 8-bit AdamW with default hyperparameters (--use-8bit-adam)",
               "on N GPUs the effective batch is 128*N pairs: raise --gradient-accumulation-steps to 2048/N for "
               "the paper's 2048")),
    Recipe(
        "balanced-dpo", "balanced-dpo",
        "BalancedDPO (Tamboli et al. arXiv 2503.12575): scorer-consensus labels and a dynamic reference",
        {"beta": Setting(5000.0, "the Diffusion-DPO loss on consensus labels (arXiv 2503.12575 v2 abstract); "
                                 "Salesforce launchers beta_dpo 5000")},
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
