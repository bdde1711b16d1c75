"""Runnable examples of `pico.sdk` (see the README's "From Python: pico.sdk")."""
