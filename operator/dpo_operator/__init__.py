"""The DPOJob operator: API, rendering, lifecycle and the `dpo` CLI."""
