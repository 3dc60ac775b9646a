"""Allows ``python -m twotower`` (and ``torchrun -m twotower``)."""

from twotower.cli import main

main()
