"""Training: `run.train` top to bottom, TRL's trainer, the callbacks, the finish, and what runs
beside them (health signals, /metrics, the reference log-prob cache)."""
