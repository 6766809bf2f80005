"""DPO on the core step: the objective around media encoded once per pair (``objective``),
trl's losses and metrics (``losses``) and the reference log-prob cache (``reference``)."""
