"""The run itself: the pipeline, the topologies, supervision glue, the budget, resume, the check pass and the trust layer (ownership, signals, guard)."""
