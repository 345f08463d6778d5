"""Ray: the Tune sweep of Ray Train trials (runner), its grid (space), one trial (trial), the
worker's context (ray_context), and the cluster checks around them (resources, cluster_capacity,
node_versions, cache_sync, identity, interrupts)."""
