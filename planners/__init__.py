"""Planners: torch-free pure functions of a TrainingGraph that return a Plan."""
