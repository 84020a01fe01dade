"""The pipeline's stages as Prefect flows and deployments (the only package that imports Prefect).

stages.py holds the plain stage functions that both the flows and the CLI call; serve.py the scheduled pipeline.
"""
