"""What a training run shows while it runs: tracker hyper-parameters, validation images, the run record.

The step metrics go to accelerate's trackers (``Accelerator(log_with=...)``): TensorBoard event files under
``<output>/logs/prefcurate/`` by default, W&B (project "prefcurate") when asked for. Validation images: the
fixed ``validation_prompts``, each with its own fixed seed (run seed + prompt index), rendered by the training
UNet (policy adapter on) with DDIM every ``validation_every`` steps into
``<output>/validation/step-NNNNNN/NN.png`` (+ ``prompts.json``), and logged to the trackers.
``latest_validation`` (no torch) finds the newest folder.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


VALIDATION_DIR = "validation"


def validation_dir(output: str | Path, step: int) -> Path:
    return Path(output) / VALIDATION_DIR / f"step-{step:06d}"


def latest_validation(run_dir: str | Path) -> tuple[int, list[tuple[str, Path]]] | None:
    """(step, [(prompt, png path), ...]) of the newest complete validation folder of a run, or None."""
    done = sorted(p for p in (Path(run_dir) / VALIDATION_DIR).glob("step-*[0-9]") if (p / "prompts.json").is_file())
    if not done:
        return None
    prompts = json.loads((done[-1] / "prompts.json").read_text())
    return int(done[-1].name.split("-")[1]), [(p, done[-1] / f"{i:02d}.png") for i, p in enumerate(prompts)]


def write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def tracker_hparams(config: dict) -> dict:
    """The scalar fields of a config dict (TensorBoard hparams take only int, float, str and bool)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}


def render_validation(components, unet, prompts: tuple[str, ...], *, resolution: int, seed: int, steps: int,
                      device, autocast) -> list:
    """PIL images, one per prompt, from the UNet as it is now; the global torch RNG is left untouched (the
    pipeline draws only from its own seeded generators), so validation does not change a resumed run."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(components.noise_scheduler.config)
    common = dict(vae=components.vae, unet=unet, scheduler=scheduler)
    if components.is_sdxl:
        pipe = StableDiffusionXLPipeline(text_encoder=components.text_encoders[0],
                                         text_encoder_2=components.text_encoders[1],
                                         tokenizer=components.tokenizers[0], tokenizer_2=components.tokenizers[1],
                                         **common)
    else:
        pipe = StableDiffusionPipeline(text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **common)
    pipe.set_progress_bar_config(disable=True)
    rng = torch.get_rng_state()
    was_training = unet.training
    unet.eval()
    try:
        images = []
        for i, prompt in enumerate(prompts):
            with torch.no_grad(), autocast():
                images.append(pipe(prompt, height=resolution, width=resolution, num_inference_steps=steps,
                                   generator=torch.Generator("cpu").manual_seed(seed + i)).images[0])
        return images
    finally:
        unet.train(was_training)
        torch.set_rng_state(rng)


def save_validation(output: str | Path, step: int, prompts: tuple[str, ...], images: list) -> Path:
    """Write ``NN.png`` + ``prompts.json`` under a temporary name, then rename the folder into place."""
    final = validation_dir(output, step)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(partial / f"{i:02d}.png")
    (partial / "prompts.json").write_text(json.dumps(list(prompts)))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def log_validation(accelerator, step: int, prompts: tuple[str, ...], images: list) -> None:
    """Send the images to every active tracker (TensorBoard: one NHWC image batch; W&B: captioned images)."""
    import numpy as np

    arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])  # (N, H, W, 3) uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", arrays, global_step=step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.run.log({"validation": [wandb.Image(im, caption=p) for im, p in zip(images, prompts)]}, step=step)
