"""DPO on the core step: the objective around media encoded once per pair (``objective``)
and trl's losses and metrics (``losses``). The cached reference of a run lives with the
run (``train.run.reference``)."""
