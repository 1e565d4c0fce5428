"""Fault injection: the real services as processes, faults applied, what was stored counted."""
