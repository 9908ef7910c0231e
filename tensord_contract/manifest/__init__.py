"""Manifests: the immutable description of one version of a set, in columns, and their codec.

A set may hold ~100,000 tensors (a DeepSeek-class shard), so nothing here builds one Python
object per tensor on the hot paths: a ``Table`` (what a put declares) and a ``Manifest`` (a
committed version) are a few numpy arrays plus the tensor names, checked with vectorised
operations, and travel as a handful of binary blobs:

    names    UTF-8 names joined by NUL (names cannot contain NUL)
    dtypes   one byte per tensor: an index into DTYPE_CODES
    ndims    one byte per tensor
    dims     int64 little-endian, every shape flattened in tensor order
    offsets  int64: byte offset in the slab, a multiple of ALIGN       (manifest only)
    sizes    int64: byte length, numel x itemsize                        (manifest only)
    fingerprints  uint64, or nil before commit; "fp" names the definition (manifest only)

``TensorSpec`` (one tensor as a tuple) remains for cold paths: file headers, sharding, export.

    columns  limits, dtype codes, and the decoding and checks of each wire column
    table    Table (what a put declares) and TensorSpec
    version  Manifest (a committed version: a table placed in a slab) and its wire form
"""

from tensord_contract.manifest.columns import (
    ALIGN,
    DTYPE_CODE,
    DTYPE_CODES,
    DTYPE_SIZES,
    FINGERPRINT_VERSION,
    FINGERPRINT_VERSIONS,
    MAX_BYTES,
    MAX_DIM,
    MAX_DIMS,
    MAX_MANIFEST_BYTES,
    MAX_TENSOR_NAME_BYTES,
    MAX_TENSORS,
    align_up,
    check_servable,
)
from tensord_contract.manifest.table import Table, TensorSpec, check_spec, table_of
from tensord_contract.manifest.version import Manifest

__all__ = [
    "ALIGN",
    "DTYPE_CODE",
    "DTYPE_CODES",
    "DTYPE_SIZES",
    "FINGERPRINT_VERSION",
    "FINGERPRINT_VERSIONS",
    "MAX_BYTES",
    "MAX_DIM",
    "MAX_DIMS",
    "MAX_MANIFEST_BYTES",
    "MAX_TENSORS",
    "MAX_TENSOR_NAME_BYTES",
    "Manifest",
    "Table",
    "TensorSpec",
    "align_up",
    "check_servable",
    "check_spec",
    "table_of",
]
