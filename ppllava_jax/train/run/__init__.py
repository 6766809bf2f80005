"""The run around the step: its config tree (``config``), one assembly of what it needs
(``assembly``), the loop, where it resumes (``resume``), checkpoints, metrics and
pictures, evaluation during training, the global batch of several processes, the export,
DPO's cached reference log-probs (``reference``), and the drawn sets of the tiny configs
(``synthetic``)."""
