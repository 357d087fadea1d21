"""Data parallelism: the train state copied to every local device, the batch split across them.

::

    state ──replicate──> every leaf (n, ...), one copy per device
    batch (n * b, T) ──shard_batch──> (n, b, T): device i gets rows i*b .. (i+1)*b - 1
    pmap(step, axis_name=AXIS): each device differentiates its rows, psum adds the sums
    metrics ──unreplicate──> device 0's copy (all copies are equal after the psum)

Several hosts: launch one process per host and call `initialize_distributed` first thing; pmap
then spans every host's devices, each process feeding its own local rows (its slice of the
global batch) and its replicated state.

A population of adapters (`jlora.core.update.population`) spreads its members over the devices instead,
on a `member_mesh`: K members on n devices, m = gcd(K, n) devices along the member axis and the
other n / m splitting the batch (8 members on 4 devices: 2 each, the whole batch on every device;
2 members: one each, the batch split in two; 1 member: the batch split in four)::

    mesh ("member": m, "data": n / m)     members' leaves  P("member")    batch rows  P("data")
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

PyTree = Any
AXIS = "batch"  # the pmap axis name the train step's collectives reduce over
MEMBERS, DATA = "member", "data"  # a population mesh's axes


def local_devices(n_devices: int | None = None) -> list:
    """The first `n_devices` local devices (None: all), in the order pmap uses."""
    devices = jax.local_devices()
    if n_devices is None:
        return devices
    if not 1 <= n_devices <= len(devices):
        raise ValueError(f"n_devices={n_devices}, but this process has {len(devices)} local device(s)")
    return devices[:n_devices]


def member_mesh(n_members: int, devices: list) -> jax.sharding.Mesh:
    """A ("member", "data") mesh over `devices` for a population of `n_members`: gcd(n_members, n)
    devices along the member axis (each holds that share of the members), the rest along the batch.

    >>> dict(member_mesh(8, jax.local_devices()[:1]).shape)
    {'member': 1, 'data': 1}
    """
    m = math.gcd(n_members, len(devices))
    return jax.sharding.Mesh(np.array(devices).reshape(m, len(devices) // m), (MEMBERS, DATA))


def replicate(tree: PyTree, n_devices: int | None = None) -> PyTree:
    """Each leaf x -> an (n, *x.shape) array holding one copy of x on each of n local devices.

    Copies go straight to their devices; no (n, ...) array is assembled on one device first.
    """
    devices = local_devices(n_devices)
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))

    def copy(x):
        x = jax.numpy.asarray(x)
        shards = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, shards)

    return jax.tree.map(copy, tree)


def unreplicate(tree: PyTree) -> PyTree:
    """This process's first device's copy of every leaf: inverse of `replicate`.

    It reads the local copy alone (no computation spanning devices), so each process of a
    multi-host run can take it on its own, in any order, without waiting for the others.
    """

    def first(x):
        if isinstance(x, jax.Array):
            return x.addressable_data(0)[0]
        return x[0]

    return jax.tree.map(first, tree)


def shard_batch(batch: PyTree, n_devices: int) -> PyTree:
    """Split each (n * b, ...) leaf into (n, b, ...): consecutive rows per device.

    Raises ValueError when the global batch does not divide evenly.
    """

    def split(x):
        if x.shape[0] % n_devices:
            raise ValueError(f"a global batch of {x.shape[0]} rows does not split evenly over {n_devices} devices")
        return x.reshape(n_devices, x.shape[0] // n_devices, *x.shape[1:])

    return jax.tree.map(split, batch)


def initialize_distributed() -> bool:
    """Join a multi-host run through ``jax.distributed.initialize`` when launched as one.

    Call it before any other JAX call. It initialises when either
      - ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) is set, with ``JAX_NUM_PROCESSES``
        and ``JAX_PROCESS_ID`` (this process's index) beside it; or
      - ``JLORA_DISTRIBUTED=1`` is set, leaving JAX to read the cluster (SLURM, Open MPI,
        Kubernetes, Cloud TPU) from its own environment.
    Otherwise it does nothing (single host), and returns False.
    """
    environ = os.environ
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        num, pid = environ.get("JAX_NUM_PROCESSES"), environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(
            address, num_processes=None if num is None else int(num), process_id=None if pid is None else int(pid)
        )
        return True
    if environ.get("JLORA_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False
