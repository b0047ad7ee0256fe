"""Checkpoint I/O: the SAIL-VL2 directory layout (hf.py) and imports of Qwen3 / AIMv2 parts (imports.py)."""
