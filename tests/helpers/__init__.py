"""Shared test helpers: tiny models, process-group harness, tensor checks, reward functions for subprocess runs."""
