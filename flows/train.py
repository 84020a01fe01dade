"""Prefect flow for the training stage: one task wrapping prefcurate.flows.stages.run_train, which calls the trainer's
own entry point, ``prefcurate.training.trainer.main(argv)`` (or ``accelerate launch`` of it with N processes). No
training logic lives in flows/: every option (``--max-steps``, ``--learning-rate``, ``--lora-rank``, ...) is
the trainer's, passed through.

The flow is also the "prefcurate-train" deployment that `prefcurate serve --train-model ...` serves and
that the pipeline starts when a new snapshot passes its gates (flows/pipeline.py).
"""
from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prefcurate.flows import stages


TRAIN_FLOW_NAME = "prefcurate-train"
TRAIN_DEPLOYMENT_NAME = "prefcurate-train"
TRAIN_DEPLOYMENT = f"{TRAIN_FLOW_NAME}/{TRAIN_DEPLOYMENT_NAME}"  # what run_deployment is given
resolve_snapshot_arg = stages.resolve_snapshot_arg


@task(task_run_name="train {loss} on {snapshot}", cache_policy=NO_CACHE)
def train_task(snapshot: str, model: str, output: str, loss: str, options: list[str],
               num_processes: int = 1) -> dict:
    result = stages.run_train(snapshot, model, output, loss, options, num_processes)
    get_run_logger().info("trained %d steps on %s; final loss %s; LoRA in %s", result["global_step"], snapshot,
                          result["final_loss"], result["lora_dir"])
    return result


@flow(name=TRAIN_FLOW_NAME, log_prints=True)
def train_flow(snapshot: str, model: str, output: str, loss: str = "dpo", options: list[str] | None = None,
               lake: str | None = None, num_processes: int = 1) -> dict:
    """Fine-tune `model` (a local diffusers folder) on a snapshot (a folder, or with `lake` an id, a name or
    "latest"); `options` are the trainer's own command-line options, e.g. ["--max-steps", "200"];
    `num_processes` > 1 trains under `accelerate launch` with that many ranks."""
    stages.check_served(lake=lake, train_model=model, train_output=output)  # before anything is read or written
    return train_task(resolve_snapshot_arg(snapshot, lake), model, output, loss, list(options or []),
                      num_processes)
