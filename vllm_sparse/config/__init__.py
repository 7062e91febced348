"""Config stage: YAML file -> validated schema -> immutable per-layer, per-head plan."""
