"""Compression algorithms: distillation, pruning, quantization, parameter sharing.

Stages land here with the Compression issues; the package exists so the
``slimtune.compress`` namespace and its place in the layering are fixed.
"""
