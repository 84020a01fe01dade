"""Prefect flow for the training stage: one task that calls the trainer's own entry point,
``training.trainer.main(argv)``, with an argv built here. No training logic lives in flows/: every
option (``--max-steps``, ``--learning-rate``, ``--lora-rank``, ...) is the trainer's, passed through.

The flow is also the "prefcurate-train" deployment that `prefcurate serve --train-model ...` serves and
that the pipeline starts when a new snapshot passes its gates (flows/pipeline.py).
"""
from __future__ import annotations

import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from curation.lake import Lake
from curation.snapshot import SnapshotError, resolve_snapshot


TRAIN_FLOW_NAME = "prefcurate-train"
TRAIN_DEPLOYMENT_NAME = "prefcurate-train"
TRAIN_DEPLOYMENT = f"{TRAIN_FLOW_NAME}/{TRAIN_DEPLOYMENT_NAME}"  # what run_deployment is given


def resolve_snapshot_arg(snapshot: str, lake: str | None = None) -> str:
    """A snapshot folder as given; otherwise an id, a name (its newest snapshot) or "latest" in the lake."""
    if os.path.isfile(os.path.join(snapshot, "manifest.json")):
        return os.path.abspath(snapshot)
    if lake is None:
        raise SnapshotError(f"{snapshot!r} is not a snapshot folder (no manifest.json in it); to give a snapshot "
                            "name, id or 'latest', also give the lake (--lake LAKE)")
    return resolve_snapshot(Lake(lake), snapshot)


def trainer_argv(snapshot: str, model: str, output: str, loss: str, options: list[str] | tuple[str, ...]) -> list[str]:
    """The argv of ``python -m training.trainer``: the four inputs, then the caller's options verbatim."""
    return ["--snapshot", snapshot, "--model", model, "--output", output, "--loss", loss, *options]


@task(task_run_name="train {loss} on {snapshot}", cache_policy=NO_CACHE)
def train_task(snapshot: str, model: str, output: str, loss: str, options: list[str]) -> dict:
    # Imported here: torch, diffusers and peft cost seconds, and only this task needs them.
    from training.trainer import main

    result = main(trainer_argv(snapshot, model, output, loss, options))
    final = result.losses[-1] if result.losses else None
    get_run_logger().info("trained %d steps on %s; final loss %s; LoRA in %s", result.global_step, snapshot,
                          final, result.lora_dir)
    return {"snapshot": snapshot, "output": str(result.output), "lora_dir": str(result.lora_dir),
            "global_step": result.global_step, "losses": result.losses, "final_loss": final}


@flow(name=TRAIN_FLOW_NAME, log_prints=True)
def train_flow(snapshot: str, model: str, output: str, loss: str = "dpo", options: list[str] | None = None,
               lake: str | None = None) -> dict:
    """Fine-tune `model` (a local diffusers folder) on a snapshot (a folder, or with `lake` an id, a name or
    "latest"); `options` are the trainer's own command-line options, e.g. ["--max-steps", "200"]."""
    return train_task(resolve_snapshot_arg(snapshot, lake), model, output, loss, list(options or []))
