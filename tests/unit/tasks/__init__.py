"""Tests of the stages as plain functions: the data pipeline, training, evaluation, their faults."""
