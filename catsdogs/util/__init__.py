"""Helpers shared by every stage (crash-safe file writes)."""
