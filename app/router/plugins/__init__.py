"""Routing plugins: filters, scorers and pickers, one module each, named in `registry.py`."""
