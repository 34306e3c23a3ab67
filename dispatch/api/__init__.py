"""What machines call: the lean /v1 handler, its guard, auth, bodies, views and relay."""
