"""Helpers that know nothing of hal0web."""
