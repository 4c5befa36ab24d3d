"""Tests of the wiring that need no whole flow: the CLI, sweep planning, reporting."""
