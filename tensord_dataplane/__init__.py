"""The data plane: how bytes move between slabs and tensors, shared by the SDK and the daemon.

    slab         the accessor interface; opening: open_slab(); host, gpu, remote,
                 published_ipc, published: one per kind
    copy         many copies as one pointer table: a batched kernel on GPUs, memmove on hosts
    fingerprint  the per-tensor check, computed for a whole slab in a few kernels
    views        TensorMap: tensors of one buffer, built on first use
    mapping, ipc host mappings and preadv; CUDA IPC mappings kept for the next read
    cuda         driver and runtime calls: allocation bounds, peer access, batched memcpy
    pinned       host slabs page-locked (registrations kept for the next read); host_dma: their copies

The transports that move bytes between nodes live in `tensord_dataplane.transport` (Mooncake, in-memory).
Nothing here does per-tensor work in Python on a hot path: every call takes whole tables.
"""
