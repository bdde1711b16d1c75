"""`python -m pico` runs the CLI."""

from pico.cli.main import main

main()
