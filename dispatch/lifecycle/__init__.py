"""Slot lifecycle: the watcher, its probes and leadership; the demo's model servers."""
