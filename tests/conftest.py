"""Shared test set-up: makes tests/comfyenv.py importable from every tier."""
