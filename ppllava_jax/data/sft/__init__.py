"""SFT's data: annotation files and corpus mixtures (``annotations``), one sample built as
the original builds it (``samples``), fixed-shape mixed batches (``batches``), the input
pipeline on the batch engine (``pipeline``), the checks a run makes before any weight
loads (``preflight``), and the media store of the corpora's videos decoded once
(``store``: built from annotation files, so it lives here, not in ``media``)."""
