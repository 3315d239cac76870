"""Evaluation of generated multi-view images: pose estimators that are independent of the reward."""
