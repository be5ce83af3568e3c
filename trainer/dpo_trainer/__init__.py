"""Runs inside the training, eval and promote pods; `config` is the pod contract."""
