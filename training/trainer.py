"""Preference fine-tuning of a diffusion UNet with LoRA: ``train(config) -> TrainResult`` and ``main(argv)``.

One micro-step (docs/methods.md §1.3): B pairs -> 2B latents, winners first; each pair shares its timestep, noise
and caption embedding; policy ε-prediction with grad; reference ε-prediction under no_grad from the same UNet
(adapters disabled, or the BalancedDPO ``ref`` adapter); per-sample errors (ε-MSE, or NCP perceptual distance)
-> a loss of ``training.losses``. Every random draw comes from one seeded ``torch.Generator`` in a fixed order,
so runs are reproducible, resumable, and identical with and without the latent cache.

Several processes: ``accelerate launch --num_processes N -m prefcurate.training.trainer --snapshot ... --model ...
--output ...`` (``--multi_gpu`` on GPUs; ``--cpu`` gives N gloo ranks on the CPU, see ``cpu_launch_num_processes``),
or ``torchrun --nproc_per_node N -m prefcurate.training.trainer ...``. Each rank takes its own pairs of every global
batch, draws from its own generator (seed + rank) and saves its own RNG states in each checkpoint, so a resumed
run continues exactly; step metrics are means over the ranks, written by rank 0 (metrics.jsonl and TensorBoard).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from prefcurate.training.preflight import (
    PreflightError, check_config, check_model, clear_run, cli_prelude, is_rank_zero,
)

if __name__ == "__main__":  # `--help`, bad inputs and the CPU rank launch are answered before the slow imports
    cli_prelude(sys.argv[1:])

import torch  # noqa: E402
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from torch import Tensor
from tqdm.auto import tqdm

from prefcurate.training import losses as L
from prefcurate.training.checkpoint import (
    begin_checkpoint, commit_checkpoint, find_checkpoint, load_checkpoint, load_rank_state, rng_states,
    save_rank_state, set_rng_states,
)
from prefcurate.training.components import encode_prompts, load_components, sdxl_micro_conditioning
from prefcurate.training.config import TrainConfig, parse_args
from prefcurate.training.latent_cache import LatentCache, build_cache, cache_key, vae_posterior
from prefcurate.training.lora import (
    POLICY, REFERENCE, LoraEMA, add_policy_lora, add_reference_lora, copy_adapter, encoder_features, lora_tensors,
    reference_view,
)
from prefcurate.training.snapshot_reader import (
    DataPosition, PairBatch, PairStream, SnapshotError, margin_beta_warning, open_snapshot,
)
from prefcurate.training.tracking import (
    log_validation, render_validation, save_validation, tracker_hparams, write_json_atomic,
)


NO_REFERENCE = ("cpo", "sft")  # reference-free losses skip the reference pass


@contextmanager
def base_encoder(unet: torch.nn.Module) -> Iterator[None]:
    """The frozen base UNet for NCP features: adapters disabled and the blocks' own gradient checkpointing off
    inside (the caller checkpoints the whole feature pass instead, see ``Trainer._errors``)."""
    flagged = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in flagged:
        m.gradient_checkpointing = False
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
        for m in flagged:
            m.gradient_checkpointing = True


@dataclass
class TrainResult:
    output: Path
    global_step: int
    losses: list[float]  # per optimiser step of this call, mean over its micro-steps
    lora_dir: Path  # load with pipe.load_lora_weights(lora_dir)
    last_checkpoint: Path | None


def _optimizer(c: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over the LoRA tensors, or bitsandbytes' 8-bit AdamW with ``use_8bit_adam``."""
    opt_kw = dict(lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.adam_weight_decay,
                  eps=c.adam_epsilon)
    if not c.use_8bit_adam:
        return torch.optim.AdamW(params, **opt_kw)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError(f"--use-8bit-adam needs bitsandbytes, which cannot be imported ({err}): "
                         f"pip install bitsandbytes (CUDA only), or drop --use-8bit-adam") from None
    return bnb.optim.AdamW8bit(params, **opt_kw)


@dataclass
class LossInputs:
    """Per-sample errors (B,) of one micro-step, split into winners and losers, and what the losses read."""

    mw: Tensor  # policy, winners
    ml: Tensor  # policy, losers
    rw: Tensor | None  # reference, winners (None for the reference-free losses)
    rl: Tensor | None
    err: dict[str, Tensor]  # (2B,) per prediction: "policy", "ref"
    ema_errors: list[Tensor]  # (2B,) per EMA annotator; empty outside Adaptive-DPO's online metric
    weight: Tensor | None  # (B,) the snapshot's curated weight, None without use_snapshot_weights


def _dpo(tr: Trainer, batch: PairBatch, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
    c = tr.config
    margin = batch.margin.to(tr.device) if c.use_snapshot_weights else None
    smoothing = batch.label_smoothing.to(tr.device) if c.use_snapshot_weights else 0.0
    return L.diffusion_dpo_loss(x.mw, x.ml, x.rw, x.rl, beta=c.beta, weight=x.weight, margin=margin,
                                label_smoothing=smoothing)


def _adaptive_dpo(tr: Trainer, batch: PairBatch, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
    c, u = tr.config, tr._adaptive_u(x.err, x.ema_errors, batch)
    return L.adaptive_dpo_loss(x.mw, x.ml, x.rw, x.rl, u, beta=c.beta, use_weight=c.use_weight,
                               weight_type=c.weight_type, k1=c.k1, c1=c.c1, use_margin=c.use_margin,
                               margin_type=c.margin_type, margin_scale=c.margin_scale)


def _balanced_dpo(tr: Trainer, batch: PairBatch, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
    votes = batch.vote_fraction.to(tr.device) if tr.config.balanced_soft_target else None
    if votes is not None and bool(votes.isnan().any()):
        raise ValueError("balanced_soft_target needs vote_fraction in every snapshot row; some are NaN")
    return L.balanced_dpo_loss(x.mw, x.ml, x.rw, x.rl, beta=tr.config.beta, winner_vote_fraction=votes)


# One entry per prefcurate.data_schemas.vocab.LOSS_TYPES name (tests/test_trainer.py checks that none is missing).
LOSS_DISPATCH: dict[str, Callable[[Trainer, PairBatch, LossInputs], tuple[Tensor, dict[str, Tensor]]]] = {
    "dpo": _dpo,
    "adaptive-dpo": _adaptive_dpo,
    "balanced-dpo": _balanced_dpo,
    "ncp-dpo": lambda tr, batch, x: L.ncp_dpo_loss(x.mw, x.ml, x.rw, x.rl, beta=tr.config.beta),
    "cpo": lambda tr, batch, x: L.cpo_loss(x.mw, x.ml, beta=tr.config.beta, sft_weight=tr.config.cpo_lambda),
    "sft": lambda tr, batch, x: L.sft_loss(x.mw),
    "ipo": lambda tr, batch, x: L.ipo_loss(x.mw, x.ml, x.rw, x.rl, beta_ipo=tr.config.beta_ipo,
                                           weight=x.weight),
}


class Trainer:
    def __init__(self, config: TrainConfig):
        if config.resolution is None:  # the model's own: UNet sample_size x VAE scale factor
            config = replace(config, resolution=check_model(config.model).resolution)
        self.config = c = config
        cuda = torch.cuda.is_available()
        if c.mixed_precision == "fp16" and not cuda:
            raise PreflightError("mixed_precision='fp16' needs CUDA (fp16 autocast with loss scaling); on the CPU use "
                             "'bf16' (bf16 autocast) or 'no'")
        trackers = {"none": [], "all": ["tensorboard", "wandb"]}.get(c.report_to, [c.report_to])
        # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another mixed
        # precision; runs in one process (tests, a serve worker) may differ. The process group (PartialState)
        # is kept.
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(mixed_precision=c.mixed_precision, cpu=not cuda,
                                       gradient_accumulation_steps=c.gradient_accumulation_steps,
                                       log_with=trackers or None,
                                       project_config=ProjectConfiguration(project_dir=str(c.output),
                                                                           logging_dir=str(Path(c.output) / "logs")))
        self.device = self.accelerator.device
        if c.overwrite_output and c.resume_from is None:
            if self.accelerator.is_main_process:
                clear_run(c.output)
            self.accelerator.wait_for_everyone()
        self.snapshot = open_snapshot(c.snapshot)
        mismatch = margin_beta_warning(self.snapshot, c.loss, c.beta, c.use_snapshot_weights)
        if mismatch and self.accelerator.is_main_process:
            warnings.warn(mismatch, UserWarning, stacklevel=2)
        torch.manual_seed(c.seed)  # LoRA A init; the step randomness has its own generator below
        self.components = comp = load_components(c.model)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision,
                                                                                torch.float32)
        self.unet = unet = comp.unet
        vae_dtype = torch.float32 if comp.is_sdxl else self.weight_dtype  # the SDXL VAE overflows in fp16
        for module, dtype in ((unet, self.weight_dtype), (comp.vae, vae_dtype),
                              *((enc, self.weight_dtype) for enc in comp.text_encoders)):
            module.to(self.device)
            if dtype != torch.float32:
                module.to(dtype=dtype)
        for enc in comp.text_encoders:
            enc.eval()
        self.lora_config = add_policy_lora(unet, c.lora_rank, c.lora_alpha, c.lora_target_modules)
        self.dynamic_ref = c.loss == "balanced-dpo" and (c.ref_update_every > 0 or c.ref_ema_tau > 0)
        if self.dynamic_ref:
            add_reference_lora(unet, self.lora_config)
        policy = lora_tensors(unet, POLICY)
        for p in policy.values():  # trained in fp32 even when the frozen weights are half precision
            p.data = p.data.float()
        if c.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.emas = [LoraEMA(unet, d) for d in (c.ema_decay_long, c.ema_decay_short)] if c.needs_online_u else []
        # the only tensors with gradients: clipping and the optimiser touch these, never the 860M frozen weights
        self.trainable = list(policy.values())
        self.model, self.optimizer = self.accelerator.prepare(unet, _optimizer(c, self.trainable))
        self.generator = torch.Generator().manual_seed(c.seed + self.accelerator.process_index)
        self.alphas_cumprod = comp.noise_scheduler.alphas_cumprod.to(self.device)
        self.prediction_type = comp.noise_scheduler.config.prediction_type  # epsilon, or v_prediction (SD2.x)
        self.global_step, self.position = 0, DataPosition()
        self.cache = self._prepare_cache() if c.latent_cache else None
        self.empty_text = (self.cache.empty if self.cache else
                           dict(zip(("text", "pooled"), encode_prompts(comp, [""], self.device, self.weight_dtype))))
        self.scaling_factor, self.is_sdxl = comp.vae.config.scaling_factor, comp.is_sdxl
        if self.cache is not None and not c.validation_prompts:  # steps never run the VAE or the text encoders
            # again (validation images would): free their memory
            comp.vae, comp.text_encoders = None, []
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ inputs
    def _prepare_cache(self) -> LatentCache:
        c = self.config
        root = Path(c.cache_dir or Path(c.output) / "latent_cache")
        root = root / cache_key(self.snapshot, c.model, c.resolution)
        if self.accelerator.is_main_process:
            build_cache(self.components, self.snapshot, root, c.resolution, self.device)
        self.accelerator.wait_for_everyone()
        return LatentCache(root, self.snapshot)

    def _encoded(self, batch: PairBatch) -> dict[str, Tensor]:
        """Posterior mean/std of winners and losers and caption embeddings, from the cache or the encoders."""
        if self.cache is not None:
            return {k: v.to(self.device) for k, v in self.cache.get(batch.rows).items()}
        w_mean, w_std = vae_posterior(self.components, batch.winner_pixels.to(self.device))
        l_mean, l_std = vae_posterior(self.components, batch.loser_pixels.to(self.device))
        text, pooled = encode_prompts(self.components, batch.prompts, self.device, self.weight_dtype)
        out = {"w_mean": w_mean, "w_std": w_std, "l_mean": l_mean, "l_std": l_std, "text": text}
        if batch.winner_sizes is not None and batch.loser_sizes is not None:  # (B, 2) width, height
            out |= {"w_size": batch.winner_sizes, "l_size": batch.loser_sizes}
        return out | ({"pooled": pooled} if pooled is not None else {})

    def _inputs(self, batch: PairBatch) -> dict[str, Tensor]:
        """Noisy latents (2B, 4, h, w), targets and conditioning; all randomness drawn here, in a fixed order."""
        enc, g, b = self._encoded(batch), self.generator, len(batch.pair_ids)
        shape = enc["w_mean"].shape[1:]
        vae_eps = torch.randn((2 * b, *shape), generator=g).to(self.device)
        drop = (torch.rand(b, generator=g) < self.config.proportion_empty_prompts).to(self.device)
        noise = torch.randn((b, *shape), generator=g).repeat(2, 1, 1, 1).to(self.device)  # shared per pair
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=g).repeat(2).to(self.device)
        z = torch.randn((b, *shape), generator=g).repeat(2, 1, 1, 1).to(self.device)  # NCP reverse-step noise
        mean = torch.cat([enc["w_mean"], enc["l_mean"]])
        std = torch.cat([enc["w_std"], enc["l_std"]])
        latents = (mean + std * vae_eps) * self.scaling_factor
        x_t = self.components.noise_scheduler.add_noise(latents, noise, t)
        target = L.prediction_target(self.prediction_type, latents, noise, t, self.alphas_cumprod)  # ε or v
        empty = self.empty_text["text"].to(self.device, enc["text"].dtype)
        text = torch.where(drop[:, None, None], empty, enc["text"]).repeat(2, 1, 1).to(self.weight_dtype)
        added = None
        if self.is_sdxl:
            pooled = torch.where(drop[:, None], self.empty_text["pooled"].to(self.device), enc["pooled"])
            sizes = torch.cat([enc["w_size"], enc["l_size"]]).cpu() if "w_size" in enc else None  # (2B, 2)
            time_ids = sdxl_micro_conditioning(sizes, self.config.resolution, 2 * b)
            added = {"text_embeds": pooled.repeat(2, 1).to(self.weight_dtype),
                     "time_ids": time_ids.to(self.device, self.weight_dtype)}
        return {"x_t": x_t.to(self.weight_dtype), "noise": noise, "target": target, "t": t, "z": z, "text": text,
                "added": added}

    # ------------------------------------------------------------------ errors and loss
    def _eps(self, module: torch.nn.Module, inp: dict) -> Tensor:
        with self.accelerator.autocast():
            return module(inp["x_t"], inp["t"], encoder_hidden_states=inp["text"],
                          added_cond_kwargs=inp["added"]).sample.float()

    def _errors(self, eps: dict[str, Tensor], inp: dict, need_grad: set[str]) -> dict[str, Tensor]:
        """Per-sample errors (2B,) of each prediction: mean squared error against the target (ε, or v for a
        v-prediction model), or the NCP perceptual distance ‖f(x_{t−1}(ε̂)) − f(x_{t−1}(ε))‖² of the frozen base
        encoder f at t−1, ε̂ being the ε the prediction implies (gradients only through ε̂)."""
        if not self.config.uses_perceptual:
            return {k: L.per_sample_mse(v, inp["target"]) for k, v in eps.items()}
        t_prev = L.ncp_previous_timestep(inp["t"])
        x_t = inp["x_t"].float()

        def step(e: Tensor, is_prediction: bool = True) -> Tensor:
            if is_prediction:
                e = L.epsilon_from_prediction(self.prediction_type, e, x_t, inp["t"], self.alphas_cumprod)
            return L.ddpm_reverse_step(x_t, e, inp["t"], self.alphas_cumprod, inp["z"])

        def features(x: Tensor) -> list[Tensor]:
            with self.accelerator.autocast(), base_encoder(self.unet):
                return encoder_features(self.unet, x.to(self.weight_dtype), t_prev, inp["text"],
                                        self.config.ncp_encoder_tap, inp["added"])

        def checkpointed_features(x: Tensor) -> list[Tensor]:
            """With gradient checkpointing the frozen-encoder pass is one non-reentrant checkpoint whose
            recomputation disables the adapters again (the UNet's own block checkpoints recomputed later, in
            backward, ran with the adapters back on: a CheckpointError)."""
            if not (self.config.gradient_checkpointing and torch.is_grad_enabled()):
                return features(x)
            return list(torch.utils.checkpoint.checkpoint(lambda v: tuple(features(v)), x, use_reentrant=False))

        with torch.no_grad():
            target = features(step(inp["noise"], is_prediction=False))  # the true ε
        out = {}
        for k, e in eps.items():
            with torch.set_grad_enabled(k in need_grad):
                out[k] = L.perceptual_distance(checkpointed_features(step(e)), target)
        return out

    def _ema_errors(self, inp: dict) -> list[Tensor]:
        """ε-MSE (2B,) of the EMA annotators (decays 0.9999, 0.5), each swapped into the policy adapter under
        no_grad. Called before the policy forward: the swap writes into tensors the policy graph would save."""
        if not self.config.needs_online_u or self.global_step < self.config.ema_warmup_steps:
            return []
        errors = []
        for ema in self.emas:
            with torch.no_grad(), ema.swapped_in(self.unet):
                errors.append(self._errors({"ema": self._eps(self.unet, inp)}, inp, set())["ema"])
        return errors

    def _adaptive_u(self, err: dict[str, Tensor], ema_errors: list[Tensor], batch: PairBatch) -> Tensor:
        """u (B,): Adaptive-DPO's online metric over (policy, EMA 0.9999, EMA 0.5) logits (zero during the EMA
        warm-up), and/or the snapshot's offline minority_score, combined per ``u_source``."""
        c, (ref_w, ref_l) = self.config, L.split_winner_loser(err["ref"])
        online = None
        if c.needs_online_u:
            online = torch.zeros(len(batch.pair_ids), device=self.device)
            if ema_errors:
                logits = [L.dpo_raw_logits(*L.split_winner_loser(e.detach()), ref_w, ref_l)
                          for e in [err["policy"], *ema_errors]]  # (K=3) x (B,)
                online = L.minority_metric(torch.stack(logits), rho=c.rho, normalize=c.normalize_logits).u
        offline = batch.minority_score.to(self.device) if c.u_source != "online" else None
        return L.combine_minority_scores(online, offline, c.u_source)

    def loss(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        c, inp = self.config, self._inputs(batch)
        eps = {}
        if c.loss not in NO_REFERENCE:
            with torch.no_grad(), reference_view(self.unet, self.dynamic_ref):
                eps["ref"] = self._eps(self.unet, inp)
        ema_errors = self._ema_errors(inp)
        eps["policy"] = self._eps(self.model, inp)
        err = self._errors(eps, inp, need_grad={"policy"})
        mw, ml = L.split_winner_loser(err["policy"])
        rw, rl = L.split_winner_loser(err["ref"]) if "ref" in err else (None, None)
        weight = batch.weight.to(self.device) if c.use_snapshot_weights else None
        compute = LOSS_DISPATCH.get(c.loss)
        if compute is None:
            raise ValueError(f"unknown loss {c.loss!r}; expected one of {', '.join(LOSS_DISPATCH)}")
        return compute(self, batch, LossInputs(mw, ml, rw, rl, err, ema_errors, weight))

    # ------------------------------------------------------------------ state
    def _after_optimizer_step(self) -> None:
        c = self.config
        for ema in self.emas:
            ema.update(self.unet)
        if self.dynamic_ref:
            if c.ref_ema_tau > 0:
                copy_adapter(self.unet, source=POLICY, target=REFERENCE, tau=c.ref_ema_tau)
            elif self.global_step % c.ref_update_every == 0:
                copy_adapter(self.unet, source=POLICY, target=REFERENCE)

    def state_dict(self) -> dict:
        """What every rank holds alike (the optimiser state and the adapters are synchronised by DDP)."""
        return {
            "global_step": self.global_step, "position": self.position.to_dict(),
            "optimizer": self.optimizer.state_dict(), "emas": [e.state_dict() for e in self.emas],
            "ref_adapter": ({k: v.detach().cpu() for k, v in lora_tensors(self.unet, REFERENCE).items()}
                            if self.dynamic_ref else {}),
            "identity": self._identity(),
        }

    def _identity(self) -> dict:
        c = self.config
        return {"snapshot_id": self.snapshot.snapshot_id, "loss": c.loss, "seed": c.seed,
                "train_batch_size": c.train_batch_size, "lora_rank": c.lora_rank,
                "world_size": self.accelerator.num_processes}

    def rank_state(self) -> dict:
        """What differs between ranks: each draws its noise from its own generator (seed + rank)."""
        return {"rank": self.accelerator.process_index, "generator": self.generator.get_state(),
                "rng": rng_states(), "position": self.position.to_dict(), "global_step": self.global_step}

    def save(self) -> Path | None:
        """Collective: every rank writes its rank state, rank 0 the shared files; returns the folder on rank 0."""
        acc, out, step = self.accelerator, self.config.output, self.global_step
        if acc.is_main_process:
            begin_checkpoint(out, step)
        acc.wait_for_everyone()
        save_rank_state(out, step, acc.process_index, self.rank_state())
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            lora = {k: v.detach() for k, v in lora_tensors(self.unet, POLICY).items()}
            path = commit_checkpoint(out, step, lora, self.state_dict(), acc.num_processes)
        acc.wait_for_everyone()
        return path

    def resume(self, path: Path) -> None:
        lora, state = load_checkpoint(path)
        if state["identity"] != self._identity():
            raise ValueError(f"checkpoint {path} was written by a different run: {state['identity']} vs "
                             f"{self._identity()}")
        mine = load_rank_state(path, self.accelerator.process_index)
        with torch.no_grad():
            for k, p in lora_tensors(self.unet, POLICY).items():
                p.copy_(lora[k])
            for k, p in (lora_tensors(self.unet, REFERENCE).items() if self.dynamic_ref else ()):
                p.copy_(state["ref_adapter"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        for ema, s in zip(self.emas, state["emas"], strict=True):
            ema.load_state_dict(s)
        if mine["position"] != state["position"] or int(mine["global_step"]) != int(state["global_step"]):
            raise ValueError(f"checkpoint {path}: rank {mine['rank']} stopped at {mine['position']}, step "
                             f"{mine['global_step']}, but rank 0 at {state['position']}, step {state['global_step']}")
        self.generator.set_state(mine["generator"])
        set_rng_states(mine["rng"])
        self.global_step, self.position = int(state["global_step"]), DataPosition(**state["position"])

    def save_final_lora(self) -> Path:
        """Diffusers-format LoRA (``pytorch_lora_weights.safetensors``) that ``pipe.load_lora_weights`` reads."""
        out = Path(self.config.output)
        # PEFT-format keys as they are: converting them mixes two key formats when targets include
        # convolutions, and load_lora_weights then silently drops the attention layers.
        layers = get_peft_model_state_dict(self.unet, adapter_name=POLICY)
        pipeline_cls = StableDiffusionXLPipeline if self.is_sdxl else StableDiffusionPipeline
        pipeline_cls.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True,
                                       unet_lora_adapter_metadata=self.lora_config.to_dict())
        return out

    # ------------------------------------------------------------------ loop
    def _batches(self) -> Iterator[PairBatch]:
        c, acc = self.config, self.accelerator
        stream = PairStream(self.snapshot, batch_size=c.train_batch_size, resolution=c.resolution, seed=c.seed,
                            buffer_rows=c.buffer_rows, decode_images=self.cache is None,
                            rank=acc.process_index, world_size=acc.num_processes)
        return stream.batches(self.position)

    def run_record(self) -> dict:
        """train_config.json: the config as it ran (resolution resolved from the model, mixed precision as
        applied) and the launch it ran under."""
        acc = self.accelerator
        return asdict(self.config) | {
            "world_size": acc.num_processes, "distributed_type": str(acc.distributed_type).split(".")[-1],
            "device": str(self.device), "frozen_weight_dtype": str(self.weight_dtype).removeprefix("torch."),
            "trackers": [t.name for t in acc.trackers], "torch_version": torch.__version__}

    def _check_finite(self, loss: Tensor) -> None:
        """Collective, before backward: every rank learns which ranks' losses are non-finite and all raise the
        same error (one rank raising alone left the others waiting in DDP's gradient all-reduce: a hang)."""
        flag = torch.tensor([0.0 if bool(torch.isfinite(loss.detach())) else 1.0], device=self.device)
        flags = self.accelerator.gather(flag)  # (world_size,)
        if bool(flags.any()):
            ranks = [int(r) for r in torch.nonzero(flags).flatten().tolist()]
            raise FloatingPointError(f"non-finite loss at step {self.global_step + 1} on rank(s) {ranks} of "
                                     f"{self.accelerator.num_processes}; every rank stopped (try a lower "
                                     f"--learning-rate or --beta, and check the snapshot's weights and margins)")

    def validate(self) -> Path | None:
        """Collective: rank 0 renders and saves the validation images and logs them; the others wait."""
        c, acc, path = self.config, self.accelerator, None
        if acc.is_main_process:
            images = render_validation(self.components, self.unet, c.validation_prompts, resolution=c.resolution,
                                       seed=c.seed, steps=c.validation_inference_steps, device=self.device,
                                       autocast=acc.autocast)
            path = save_validation(c.output, self.global_step, c.validation_prompts, images)
            log_validation(acc, self.global_step, c.validation_prompts, images)
        acc.wait_for_everyone()
        return path

    def fit(self) -> TrainResult:
        c, acc = self.config, self.accelerator
        out = Path(c.output)
        # TensorBoard: <output>/logs/prefcurate/; W&B: project "prefcurate", the run named after its output folder
        acc.init_trackers("prefcurate", config=tracker_hparams(asdict(c)),
                          init_kwargs={"wandb": {"name": Path(c.output).resolve().name}})
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / "train_config.json", self.run_record())
        losses, sums, micro, last_ckpt, t0 = [], {}, 0, None, time.perf_counter()
        t_step = t0
        batches = self._batches()
        bar = tqdm(total=c.max_steps, initial=self.global_step, desc=f"train {c.loss}", unit="step",
                   disable=None if acc.is_main_process else True)  # None: shown on a terminal only
        while self.global_step < c.max_steps:
            batch = next(batches)
            with acc.accumulate(self.model):
                loss, metrics = self.loss(batch)
                if (c.debug_nonfinite_step == self.global_step + 1 and c.debug_nonfinite_rank == acc.process_index):
                    loss = loss * float("nan")  # the documented test hook of TrainConfig
                self._check_finite(loss)
                acc.backward(loss)
                if acc.sync_gradients and c.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.trainable, c.max_grad_norm)
                for group in self.optimizer.param_groups:  # linear warm-up, then constant
                    group["lr"] = c.learning_rate * min(1.0, (self.global_step + 1) / max(1, c.lr_warmup_steps))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.position, micro = batch.position, micro + 1
            for k, v in {"loss": loss.detach(), **metrics}.items():
                if v.dim() == 0:
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
            if not acc.sync_gradients:
                continue
            self.global_step += 1
            self._after_optimizer_step()
            keys = sorted(sums)  # the same keys on every rank: one all-reduce of the micro-step means
            means = acc.reduce(torch.stack([sums[k] for k in keys]).to(self.device) / micro, reduction="mean")
            record = dict(zip(keys, means.tolist(), strict=True))
            now = time.perf_counter()
            record.update(step=self.global_step, lr=self.optimizer.param_groups[0]["lr"],
                          elapsed_s=round(now - t0, 4), step_time_s=round(now - t_step, 4),
                          pairs=micro * c.train_batch_size * acc.num_processes)
            t_step = now
            losses.append(record["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('implicit_acc', float('nan')):.2f}")
            if acc.is_main_process:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            acc.log({k: v for k, v in record.items() if k != "step"}, step=self.global_step)  # rank 0 only
            sums, micro = {}, 0
            if self.global_step % c.checkpoint_every == 0 or self.global_step == c.max_steps:
                last_ckpt = self.save()
            if c.validation_prompts and (self.global_step % c.validation_every == 0
                                         or self.global_step == c.max_steps):
                self.validate()
        bar.close()
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.save_final_lora()
            write_json_atomic(out / "train_config.json", self.run_record())
        acc.end_training()
        return TrainResult(out, self.global_step, losses, out, last_ckpt)


def train(config: TrainConfig) -> TrainResult:
    trainer = Trainer(config)
    if config.resume_from:
        trainer.resume(find_checkpoint(config.output, config.resume_from))
    return trainer.fit()


def main(argv: list[str] | None = None) -> TrainResult:
    """``python -m prefcurate.training.trainer --snapshot DIR --model DIR --output DIR --loss dpo --max-steps N ...``;
    inputs are checked first (``prefcurate.training.preflight``: one-line ``PreflightError``)."""
    config = parse_args(argv)
    check_config(config)
    return train(config)


def _fail(err: Exception, status: int) -> None:
    """One line from rank 0. With several ranks the process ends at once (``os._exit``): a normal exit tears
    down the gloo/NCCL group, which waits tens of seconds for peers that are exiting too. Every file the
    trainer writes is complete or renamed into place atomically, so nothing is lost by skipping that."""
    if is_rank_zero():
        print(f"error: {err}", file=sys.stderr)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    try:
        result = main(sys.argv[1:])
    except (PreflightError, SnapshotError, FileNotFoundError) as err:  # bad input: one line, exit 3
        _fail(err, 3)
    except FloatingPointError as err:  # every rank raised the same agreed error
        _fail(err, 1)
    if is_rank_zero():
        print(json.dumps({"global_step": result.global_step, "output": str(result.output),
                          "final_loss": result.losses[-1] if result.losses else None}))
