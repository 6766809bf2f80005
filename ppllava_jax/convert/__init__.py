"""Checkpoint conversion: one streaming loader, one key table per checkpoint family."""
