"""The edge agent runtime and its tasks."""
