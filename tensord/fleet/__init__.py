"""Streaming replicas: many nodes pulling one set at once form a pipeline instead of a queue.

    chunks   the chunk grid of a slab and bitmaps of held chunks
    policy   which holder a puller asks for which chunks, and what a holder answers (pure:
             the daemon and benchmarks/fleet_sim.py run the same code)
    serve    the holder's side: partial replicas being filled, grants, egress counters
    pull     the puller's side: one streaming pull of one version into a local slab
    progress what a pull has done so far (bytes per source, seconds per phase)
    cluster  this node in the cluster: reading from, pinning on and replicating from peers
    pairs    NCCL (GPU) / gloo (host) two-rank groups between daemons, for nodes the Transfer
             Engine cannot reach

A node pulling a set advertises a *partial* replica (its chunk bitmap, in the registry under
`@s/`, apart from complete replicas) and serves the chunks it holds to other pullers while it
is still receiving. Nothing that reads sets (open, get, mount, info's replicas) ever sees a
partial replica: it becomes a replica only once every tensor's fingerprint checked.
"""
