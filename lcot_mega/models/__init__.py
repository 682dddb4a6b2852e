"""Model helpers that are not architecture mappings: tiny random models for smoke runs and tests."""
