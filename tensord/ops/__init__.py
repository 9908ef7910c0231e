"""The ops of the control plane, one module per group; `service.Service` dispatches a request
to its `op_<name>` method.

- `catalogue`: what exists and where (ls, info, delete, status, nodes, wait);
- `data`: reading and writing versions (open, release, put_begin, put_commit, put_abort);
- `files`: checkpoints the daemon reads itself (load);
- `fleet`: copies between nodes (replicate and its fan-out; stream_open, stream_chunks,
  stream_pair: the holder's side of a streaming pull).

Each op decodes its request with its typed message (`tensord_contract`: `messages`,
`catalogue_messages`, `node_messages`, `table_messages`, `streams`), then asks the store or the
cluster, and answers with the reply's `to_wire()`.
"""
