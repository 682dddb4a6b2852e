"""Small helpers the other packages share: atomic file replacement, local process groups, tiny random models."""
