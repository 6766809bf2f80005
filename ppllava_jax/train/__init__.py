"""Training: losses first; the SFT and DPO trainers build on them."""
