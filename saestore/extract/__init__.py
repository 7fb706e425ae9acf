"""Extraction: run a model with SAEs over an author-labelled corpus into a run store."""
