"""The `dpo` command: validate, render, plan, run, compare, pull, crd, operator."""
