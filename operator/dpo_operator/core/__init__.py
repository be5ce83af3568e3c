"""The pure core: from a DPOJob (and the installation's settings) to its plan, its children
and the lifecycle's decisions. No I/O, no Kubernetes."""
