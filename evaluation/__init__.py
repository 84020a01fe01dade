"""Model evaluation: base vs tuned images for the same prompts and seeds, scored and summarised as
win rates with confidence intervals (winrate). Imports curation's scorers and training's sampler.
"""
