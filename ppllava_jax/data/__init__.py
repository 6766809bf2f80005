"""Model inputs, by workflow: ``media/`` (pixels), ``text/`` (templates, tokenizers),
``sft/`` and ``dpo/`` (each workflow's samples, batches and pipeline), on what they share:
``batching`` (what every fixed-shape batch type shares), ``engine`` (the batch plan, a
step's shards and the resumable iterator) and ``workers`` (Grain's worker processes);
``processor`` builds inference inputs (eval.py, accuracy during training)."""
