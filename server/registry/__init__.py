"""The forget-target registry: SQLAlchemy models, the one store that reads and writes them, and the live snapshot."""
