"""Where a sample's pixels come from: decoding videos and frame folders with the original's
frame sampling (``video``), preprocessing them as transformers' processors do
(``preprocess``), VideoMME's subtitles at the sampled frames (``subtitles``), and the
ArrayRecord media store of frames decoded once (``store``). NumPy / PIL only."""
