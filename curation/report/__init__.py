"""The curation report: one HTML page (page) with its figures (plots) from a curation run.
"""
