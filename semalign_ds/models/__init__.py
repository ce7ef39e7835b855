"""Model access: one adapter table per architecture family, loading by path, layer-state capture."""
