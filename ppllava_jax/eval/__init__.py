"""Evaluation: inference loops, benchmark scorers and pictures of relevance."""
