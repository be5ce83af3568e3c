"""The contract between the operator and the trainer, pydantic only: trainer.json, the reports
and termination messages, the pod's files, env and exit codes, the builtin presets, adapter
digests and the OCI artifact format. The operator imports nothing else from the trainer side.
"""
