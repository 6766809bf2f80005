"""SFT's data: annotation files and corpus mixtures (``annotations``), one sample built as
the original builds it (``samples``), fixed-shape mixed batches (``batches``), the input
pipeline on the batch engine (``pipeline``) and the checks a run makes before any weight
loads (``preflight``)."""
