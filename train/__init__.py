"""Octo's trainer: `python -m train --config train/config.json`."""
