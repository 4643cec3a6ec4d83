"""Patches of vLLM internals, one per file, each where vLLM has no extension point.

Every patch says why it exists, how it works and when it can go, and is idempotent (vLLM loads
plugins once per process, but a process may call ``register()`` again). Each has a test in
``tests/test_patches.py`` that fails loudly when a vLLM upgrade moves what it patches.
"""
