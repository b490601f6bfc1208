"""Attacks that judge whether a protection works (the attacker's view)."""
