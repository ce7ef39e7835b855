"""Planning a run before it starts: the cost model and `semalign plan`."""
