"""Model inputs: reading videos and frames, preprocessing pixels, building the text."""
