"""Fuzz targets (`targets.py`) and their atheris runner (`python -m fuzz.run`)."""
