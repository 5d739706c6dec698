"""Analyses of trained retrievers (embedding-space geometry)."""
