"""What only a device runs: PID 1, the supervisor, containers, updates, the API."""
