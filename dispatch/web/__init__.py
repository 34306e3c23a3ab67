"""The pages: chat and Activity, the live feed and its WebSocket."""
