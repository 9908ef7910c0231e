"""The contract between the SDK and the daemon: what both sides must agree on, in one place.

- `wire`: frames, the op table, protocol version and limits;
- `errors`: the exception tree and its closed set of wire codes;
- `manifest`: the columnar description of a version's tensors (and its validation);
- `names`: set names, prefixes, versions;
- `descriptors`: how a reply says where a slab lies (host memfd, CUDA IPC, remote replica);
- `defaults`: the default socket;
- `bulk`: a helper both sides use around large msgpack work.

Imported by `sdk` (the client) and `tensord` (the daemon); imports neither of them, nor torch
(`manifest` needs numpy).
"""
