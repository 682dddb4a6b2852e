"""Supervised fine-tuning (`lcot-mega sft`): the study's cold start on the same Megatron actor as RL."""
