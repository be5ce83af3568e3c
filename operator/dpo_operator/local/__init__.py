"""`dpo run`: the lifecycle carried out on this machine, a process for each pod."""
