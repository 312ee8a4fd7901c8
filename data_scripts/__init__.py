"""Converters of the public benchmark datasets into the minissl store (``prepare_<dataset>.py``)."""
