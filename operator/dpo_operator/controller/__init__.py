"""The operator's executor on Kubernetes: kopf wiring, the cache, the work queue, the DPOJob
controller and the operator's own API requests. All of its Kubernetes I/O is here."""
