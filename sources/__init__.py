"""Drop-in source plugins shipped with agentwatch (see sources/README in agentwatch.py)."""
