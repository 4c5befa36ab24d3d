"""Tests of the registry side: register, gate, aliases, consumers, lineage and reproduce checks."""
