"""Inputs and outputs: preference data, models and tokenizers, downloads, the run's artifacts."""
