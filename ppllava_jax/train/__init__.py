"""Training: ``core/`` (the one pure step for any objective and what it needs), ``sft``
(SFT's objective), ``dpo/`` (DPO's objective, losses and reference), ``run/`` (the run
around the step: config, assembly, loop, checkpoints, metrics, export)."""
