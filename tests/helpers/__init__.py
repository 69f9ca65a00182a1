"""Shared test helpers (input cases, reference configs); not test modules."""
