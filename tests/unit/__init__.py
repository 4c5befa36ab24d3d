"""Unit tests, one module per product module or concern, mirroring the packages (qlora/, tasks/, registry/, flows/, demo/)."""
