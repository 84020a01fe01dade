"""Preference fine-tuning of diffusion UNets with LoRA (diffusers + peft + accelerate) on curated snapshots.

Reads snapshots only (training.snapshot_reader, through data_schemas.snapshot_contract), never curation's internals.
"""
