"""The way to the model servers: the client and its pool, forward, admission, outliers."""
