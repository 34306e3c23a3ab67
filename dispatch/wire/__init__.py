"""Wire protocols: what each client protocol's bodies, errors and streams look like."""
