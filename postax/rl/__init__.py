"""Reinforcement learning pieces: advantage estimators, rollouts and reward functions."""
