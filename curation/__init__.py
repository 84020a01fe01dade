"""Curation: from raw preference pairs to weighted, immutable training snapshots, as plain functions (no Prefect).

Rooms: store (the lake, SQL), ingest, scorers (and their runner), labels (votes to curated labels), report,
synthetic (the sample world), snapshot.py (policies and the writer).
"""
