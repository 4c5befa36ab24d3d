"""Tests of the demo builder."""
