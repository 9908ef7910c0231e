"""The etcd registry (`EtcdRegistry`): the cluster-wide catalogue in etcd.

keys.py         the key schema: every key built and parsed in one place
values.py       what values hold: msgpack, manifests compressed and cut into parts
connection.py   endpoints, failover, etcd's failures mapped once to Unavailable
lease.py        the node's lease as a session: keepalive, loss, re-grant, revoke
registry.py     `EtcdRegistry`: the registry's operations and watch over the above
"""

from tensord.registry.etcd.registry import EtcdRegistry

__all__ = ["EtcdRegistry"]
