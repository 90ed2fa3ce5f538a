"""Storage: the engine adapter, table models and migrations."""
