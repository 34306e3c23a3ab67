"""How processes converge: the table store, sync, leases, the bus, affinity stores."""
