"""Prompt learning: templates, verbalizers, soft prompts.

Stages land here with the Prompt-learning issue; the package fixes the
``slimtune.prompt`` namespace.
"""
