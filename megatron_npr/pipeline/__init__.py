"""`npr pipeline`: the recipe end to end on a tiny model (bootstrap, stages, report)."""
