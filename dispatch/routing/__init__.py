"""The routing core: the table, states, the resolver, scopes, explanations. Pure: no ORM, no I/O."""
