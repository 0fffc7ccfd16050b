"""Fixtures of the kernel tests: ``fake_driver`` (tests/launch_fakes.py) for the launcher and replay tests."""
from launch_fakes import fake_driver  # noqa: F401  (a fixture)
