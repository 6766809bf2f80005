"""DPO's data: LLaVA-Hound preference rows and one preference sample, the media once per
pair (``rows``), and pair batches on the batch engine (``pairs``)."""
