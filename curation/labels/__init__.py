"""From votes to labels: scorer votes, consensus, per-pair metrics, per-annotator statistics and
the label model (reliability), and the `curate` stage that writes them as one curation run.
"""
