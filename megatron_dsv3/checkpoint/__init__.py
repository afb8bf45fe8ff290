"""Checkpoints: the HF key table (``hf_keys``), reader (``hf_reader``) and writer (``hf_writer``)."""
