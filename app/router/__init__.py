"""Routing decisions as plain Python: block hashing, model resolution, and (later) the prefix index,
scheduler and admission. Nothing in this package imports Ray."""
