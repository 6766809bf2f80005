"""Evaluation, what ``eval.py`` runs: its command line (``app``), the jobs a run answers
(``jobs``: one video, a benchmark's items, open-ended questions), the resumable answering
loop (``runner``) with its saved records and their fingerprints (``records``,
``fingerprint``), multiple-choice benchmarks (``mcq/``: items, prompts, protocols,
scoring), open-ended QA (``qa``), and relevance heat-maps (``heatmap``)."""
