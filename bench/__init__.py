"""Measurements that back the figures in the docs; each module runs with ``python -m bench.<name>``."""
