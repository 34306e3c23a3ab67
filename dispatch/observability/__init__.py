"""What is seen of the traffic: decisions, metrics, the request log, log lines."""
