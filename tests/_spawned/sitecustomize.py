"""Run at the start of the Python processes a test spawns with this folder on ``PYTHONPATH``:
torchvision imports there too (see ``tests/_zoo.py``; Lightning imports it through
torchmetrics before any test code runs in the child)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _zoo  # noqa: E402

_zoo.make_torchvision_importable()
