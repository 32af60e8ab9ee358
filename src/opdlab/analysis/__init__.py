"""Measure how a tuned checkpoint differs from its source, tensor by tensor (reads files only)."""
