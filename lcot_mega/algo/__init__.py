"""Pure tensor math of the RL step (torch only): advantages, selection, shaping, losses, metrics."""
