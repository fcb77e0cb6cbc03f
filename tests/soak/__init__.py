"""A randomized soak run of a sandbox device (#14): many updates, some broken,
rollbacks, reboots, restarts and power cuts at random instants, with a model of
what the device must look like checked after every step. ``tools/soak`` runs it
long; ``tests/test_soak.py`` runs it short on every change."""
