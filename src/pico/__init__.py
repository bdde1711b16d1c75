"""Pico: a clustered reverse tunnel proxy."""

__version__ = "0.1.0"
