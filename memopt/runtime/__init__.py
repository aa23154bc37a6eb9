"""Runtime: the hooks that apply a Plan to a model (keep, swap, recompute, token-wise)."""
