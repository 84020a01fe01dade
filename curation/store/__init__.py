"""The lake store: the Parquet lake's layout, atomic writes and its single-writer lock (lake),
stable ids (ids), and the read-only SQL interface over it (sql).
"""
