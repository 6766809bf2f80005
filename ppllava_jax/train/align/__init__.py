"""Image-text alignment, the stage that trains a relevance scorer for a vision tower
(issue 23, part 1; the ICLR version's InternVL3 model needed one): so far its losses and
retrieval metric (``losses``). The objective, the caption-pair data and the recipes are
still to come."""
