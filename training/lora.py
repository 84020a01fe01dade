"""LoRA adapters on the UNet: the policy, the frozen reference views, EMA "annotators", and the NCP encoder.

One UNet holds everything; there is never a second full copy:
- policy = the ``default`` LoRA adapter (trained);
- Diffusion-DPO reference = the same UNet with adapters disabled (diffusers ``disable_adapters``);
- BalancedDPO dynamic reference = a second, frozen adapter ``ref`` that is hard-copied from (or EMA-tracks)
  the policy adapter, selected with ``set_adapter`` for the reference pass;
- Adaptive-DPO annotators = two EMA copies of the policy's LoRA tensors only, swapped into the ``default``
  adapter under no_grad when their logits are needed.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from torch import Tensor


POLICY, REFERENCE = "default", "ref"


def add_policy_lora(unet: UNet2DConditionModel, rank: int, alpha: float, targets: tuple[str, ...]) -> LoraConfig:
    """Freeze the UNet and attach the trainable ``default`` adapter (diffusers DPO script setup: gaussian A,
    zero B, so the policy starts equal to the reference and the first DPO loss is ln 2)."""
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    unet.add_adapter(config, adapter_name=POLICY)
    return config


def add_reference_lora(unet: UNet2DConditionModel, config: LoraConfig) -> None:
    """A second adapter of the same shape, frozen, initialised to the policy's weights (BalancedDPO)."""
    unet.add_adapter(LoraConfig(r=config.r, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                target_modules=sorted(config.target_modules)), adapter_name=REFERENCE)
    unet.set_adapter(POLICY)  # add_adapter activated (and unfroze) "ref"; the policy is the active adapter
    copy_adapter(unet, source=POLICY, target=REFERENCE)


def lora_tensors(unet: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's LoRA parameters by module path, adapter name removed: ``...to_q.lora_A.weight``."""
    out = {}
    for name, param in unet.named_parameters():
        parts = name.split(".")
        if len(parts) >= 3 and parts[-3] in ("lora_A", "lora_B") and parts[-2] == adapter:
            out[".".join(parts[:-2] + parts[-1:])] = param
    if not out:
        raise ValueError(f"UNet has no LoRA adapter named {adapter!r}")
    return out


@torch.no_grad()
def copy_adapter(unet: torch.nn.Module, *, source: str, target: str, tau: float = 0.0) -> None:
    """target ← τ·target + (1 − τ)·source, tensor by tensor (τ = 0: hard copy)."""
    src, dst = lora_tensors(unet, source), lora_tensors(unet, target)
    for name, param in dst.items():
        param.mul_(tau).add_(src[name].to(param.dtype), alpha=1.0 - tau)


@contextmanager
def reference_view(unet: UNet2DConditionModel, dynamic: bool) -> Iterator[None]:
    """The reference model: adapters disabled (frozen base), or the ``ref`` adapter when ``dynamic``."""
    if dynamic:
        unet.set_adapter(REFERENCE)
    else:
        unet.disable_adapters()
    try:
        yield
    finally:
        if dynamic:
            unet.set_adapter(POLICY)
        else:
            unet.enable_adapters()


def ema_decay(update: int, decay: float) -> float:
    """diffusers ``EMAModel.get_decay`` without warm-up power: 0 at the first update (a copy), then
    min(decay, (1 + s)/(10 + s)) with s = update − 1 (docs/methods.md §2.2)."""
    step = update - 1
    if step <= 0:
        return 0.0
    return min(decay, (1 + step) / (10 + step))


class LoraEMA:
    """An EMA of the policy adapter's LoRA tensors only (fp32), with the diffusers warm-up schedule."""

    def __init__(self, unet: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().float().clone() for k, v in lora_tensors(unet, POLICY).items()}

    @torch.no_grad()
    def update(self, unet: torch.nn.Module) -> None:
        self.updates += 1
        d = ema_decay(self.updates, self.decay)
        for name, param in lora_tensors(unet, POLICY).items():
            self.shadow[name].mul_(d).add_(param.detach().float(), alpha=1.0 - d)

    @contextmanager
    def swapped_in(self, unet: torch.nn.Module) -> Iterator[None]:
        """Temporarily put the EMA tensors into the policy adapter (``store`` / ``copy_to`` / ``restore``)."""
        params = lora_tensors(unet, POLICY)
        stored = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(stored[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def encoder_features(unet: UNet2DConditionModel, sample: Tensor, timestep: Tensor, text: Tensor, tap: str,
                     added_cond_kwargs: dict[str, Tensor] | None = None) -> list[Tensor]:
    """NCP-DPO perceptual encoder f(x, c, t) (arXiv 2406.17636v2 §4): the UNet's time embedding, ``conv_in``
    and down blocks with text cross-attention (+ the mid block for ``tap="mid"``), the same computation as
    the first half of ``UNet2DConditionModel.forward``. Returns the tapped feature maps, each (N, C', H', W').
    Run it with adapters disabled for the frozen base encoder."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added_cond_kwargs or {})
    if aug is not None:  # SDXL text_time embedding
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    text = unet.process_encoder_hidden_states(encoder_hidden_states=text, added_cond_kwargs=added_cond_kwargs or {})
    h = unet.conv_in(sample)
    features = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
        else:
            h, _ = block(hidden_states=h, temb=emb)
        features.append(h)
    if tap == "all_down":
        return features
    if tap == "last_down":
        return features[-1:]
    if tap == "mid":
        if getattr(unet.mid_block, "has_cross_attention", False):
            return [unet.mid_block(h, emb, encoder_hidden_states=text)]
        return [unet.mid_block(h, emb)]
    raise ValueError(f"tap must be last_down, mid or all_down, got {tap!r}")
