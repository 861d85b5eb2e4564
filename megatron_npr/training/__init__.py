"""Training: SFT, RL loops and stage-2 rejection sampling."""
