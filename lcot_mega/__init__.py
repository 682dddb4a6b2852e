"""lcot-mega: RL for long-chain-of-thought reasoning LLMs on Megatron-core (see DESIGN.md)."""

__version__ = "0.1.0"
