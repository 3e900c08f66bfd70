"""Snapshots: the file format (atomic write, ``weights_only`` load, the newest valid one), the checkpointer over
named parts, the random state, and the per-iteration order record that proves two runs saw the same samples."""
