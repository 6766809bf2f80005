"""Where a sample's pixels come from: decoding videos and frame folders with the original's
frame sampling (``video``), training media read as the original's loaders read them
(``frames``), preprocessing as transformers' processors do (``preprocess``), and VideoMME's
subtitles at the sampled frames (``subtitles``). NumPy / PIL only; nothing here knows an
annotation format."""
