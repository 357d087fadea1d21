"""One placement: a device mesh with named axes, and where each part of a step lives on it.

Every step (one adapter, a population, an evaluation) is `jax.jit` over one mesh; what runs where
is the sharding of its inputs and outputs, and XLA (GSPMD) adds the communication: the gradient
sum over the batch's rows, the gathering of a base weight's pieces before a layer reads it::

    n devices (every process's)  ──reshape──>  mesh ("member": m, "data": d, "fsdp": f),  m * d * f = n

    f = fsdp                   the frozen base: every weight of ndim >= 2 split in f pieces along its
                               largest dimension that f divides (1-D leaves and the adapters whole)
    m = gcd(K, n / f)          K members: each device holds K / m of them (m = 1 for one adapter, and
                               in a run of several processes)
    d = n / (m * f)            the rest: the batch's rows are split over "data" x "fsdp"

    a member-stacked leaf      P("member")                      (the same as P() when m = 1)
    a base weight              P(..., "fsdp", ...)              at its largest dimension f divides
    an adapter, a 1-D leaf     P()                              (one adapter's optimizer state alike)
    a batch's rows             P(("data", "fsdp"))               (P(("member", "data", "fsdp")) when m = 1)

For example, 4 devices: one adapter with ``fsdp=2`` is the mesh (1, 2, 2), each device holding half
of every base weight and a quarter of each batch; 8 members is (4, 1, 1), two members a device and
the whole batch on each; 2 members with ``fsdp=2`` is (2, 1, 2). One device is (1, 1, 1), every
sharding replicated, which compiles to what a plain `jax.jit` compiles.

A state goes on the mesh once (`Placement.place`), a batch at each step (`Placement.place_batch`:
in a run of several processes, each gives its own rows of the global batch), and anything comes
back as host numpy through `fetch`:

>>> p = mesh_placement(8, devices=jax.local_devices()[:1])
>>> p.shape, p.rows.spec
({'member': 1, 'data': 1, 'fsdp': 1}, P(('member', 'data', 'fsdp'),))
>>> fetch(p.place_batch({"input_ids": np.arange(6).reshape(2, 3)}))["input_ids"].tolist()
[[0, 1, 2], [3, 4, 5]]
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora.errors import ConfigError
from jlora.tree import dotted, path_names

PyTree = Any
MEMBERS, DATA, FSDP = "member", "data", "fsdp"
AXES = (MEMBERS, DATA, FSDP)
ADAPTERS = "lora"  # the collection of adapter leaves (kept whole, or stacked by member)


def local_devices(n_devices: int | None = None) -> list:
    """The first `n_devices` of this process's devices (None: all)."""
    devices = jax.local_devices()
    if n_devices is None:
        return devices
    if not 1 <= n_devices <= len(devices):
        raise ValueError(f"n_devices={n_devices}, but this process has {len(devices)} local device(s)")
    return devices[:n_devices]


def all_devices() -> list:
    """Every process's devices, a process's own together (so its batch rows are one block)."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def mesh_placement(n_members: int = 1, *, fsdp: int = 1, devices: Sequence | int | None = None) -> Placement:
    """The `Placement` of `n_members` adapters (1: a single one) with the base split `fsdp` ways, on
    `devices` (a list; n: this process's first n; None: every process's): fsdp along "fsdp",
    gcd(n_members, n / fsdp) along "member" (1 in a run of several processes), the rest along "data".

    Raises ConfigError when fsdp is not a divisor of the number of devices.

    >>> dict(mesh_placement(2, fsdp=1, devices=jax.local_devices()[:1]).mesh.shape)
    {'member': 1, 'data': 1, 'fsdp': 1}
    """
    if devices is None or isinstance(devices, int):
        devices = all_devices() if devices is None else local_devices(devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ConfigError(f"mesh.fsdp={fsdp} must be >= 1 and divide the {n} devices")
    m = 1 if jax.process_count() > 1 else math.gcd(n_members, n // fsdp)
    return Placement(Mesh(np.array(devices, dtype=object).reshape(m, n // (m * fsdp), fsdp), AXES))


class Placement(NamedTuple):
    """A ("member", "data", "fsdp") mesh and the shardings of what a step reads on it (module docstring)."""

    mesh: Mesh

    @property
    def shape(self) -> dict[str, int]:
        """{"member": m, "data": d, "fsdp": f}."""
        return dict(self.mesh.shape)

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def row_devices(self) -> int:
        """How many pieces a batch's rows are split into (data x fsdp)."""
        return self.shape[DATA] * self.shape[FSDP]

    def describe(self) -> str:
        """``"member 1 x data 2 x fsdp 2"``."""
        return " x ".join(f"{axis} {size}" for axis, size in self.shape.items())

    def sharding(self, *spec) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    @property
    def whole(self) -> NamedSharding:
        """Every device holds the leaf whole."""
        return self.sharding()

    @property
    def members(self) -> NamedSharding:
        """A member-stacked leaf (axis 0 K): K / m members a device; whole when m = 1."""
        return self.sharding(MEMBERS) if self.shape[MEMBERS] > 1 else self.whole

    @property
    def rows(self) -> NamedSharding:
        """A batch leaf: its rows (axis 0) split over every axis that holds no members."""
        return self.sharding(tuple(a for a in AXES if a != MEMBERS or self.shape[MEMBERS] == 1))

    def base_sharding(self, shape: Sequence[int], name: str = "a weight") -> NamedSharding:
        """A frozen base leaf: split along "fsdp" at its largest dimension that fsdp divides (the first
        of equals); whole when 1-D or fsdp is 1. Raises ConfigError, naming it, when no dimension fits."""
        f = self.shape[FSDP]
        if f == 1 or len(shape) < 2:
            return self.whole
        fits = [i for i, size in enumerate(shape) if size % f == 0]
        if not fits:
            raise ConfigError(f"mesh.fsdp={f} divides no dimension of the base weight {name} {tuple(shape)}")
        at = max(fits, key=lambda i: (shape[i], -i))
        return self.sharding(*(FSDP if i == at else None for i in range(len(shape))))

    def leaf_sharding(self, path: tuple, x: Any, *, stacked: bool = False) -> NamedSharding:
        """The sharding of one leaf of a state or of variables: `members` when `stacked`, whole for an
        adapter's leaf (under "lora") or a 1-D one, else `base_sharding`."""
        if stacked:
            return self.members
        if ADAPTERS in path_names(path):
            return self.whole
        return self.base_sharding(np.shape(x), dotted(path))

    def tree_shardings(self, tree: PyTree, stacked: PyTree = False) -> PyTree:
        """`leaf_sharding` of every leaf; `stacked` is a bool or a tree prefix of 0 / None (0: stacked, as
        `jlora.core.update.population.member_axes` gives)."""
        flags = jax.tree.map(
            lambda s, sub: jax.tree.map(lambda _: s is not None and s is not False, sub),
            stacked,
            tree,
            is_leaf=lambda s: s is None or isinstance(s, bool),
        )
        return jax.tree_util.tree_map_with_path(lambda p, x, s: self.leaf_sharding(p, x, stacked=s), tree, flags)

    def state_shardings(self, state, *, stacked: bool = False):
        """A `TrainState` of shardings: the step whole; the trainable leaves and optimizer state by
        `leaf_sharding` (by member when `stacked`, a population's); the frozen base by `base_sharding`
        and the frozen adapter leaves (their scales) whole, or by member when `stacked`."""
        frozen = {c: self.tree_shardings(t, stacked and c == ADAPTERS) for c, t in state.frozen.items()}
        return state.replace(
            step=self.whole,
            trainable=self.tree_shardings(state.trainable, stacked),
            opt_state=self.tree_shardings(state.opt_state, stacked),
            frozen=frozen,
        )

    def place(self, state, *, stacked: bool = False):
        """A `TrainState` (host arrays, or arrays anywhere) on the mesh, as `state_shardings` says."""
        return put(state, self.state_shardings(state, stacked=stacked))

    def place_batch(self, batch: Mapping) -> dict:
        """A batch on the mesh, its rows split as `rows` says. A host batch is the global batch: in a run of
        several processes each takes the rows its devices hold (`jax.make_array_from_process_local_data`)."""
        return {k: _put_rows(x, self.rows) for k, x in batch.items()}

    def fetch(self, tree: PyTree) -> PyTree:
        """`fetch` (the module's function): every array of `tree` as host numpy."""
        return fetch(tree)


def put(tree: PyTree, shardings: PyTree) -> PyTree:
    """Each leaf of `tree` with the sharding at its place in `shardings` (a leaf already so is kept)."""
    return jax.tree.map(_put, tree, shardings)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x  # (an equivalent sharding is not enough: the mesh is part of the traced type, and would recompile)
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(fetch(x))  # the same values on every process: each takes its devices' pieces
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _put_rows(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) or jax.process_count() == 1:
        return _put(x, sharding)
    x = np.asarray(x)
    rows = [index[0] for index in sharding.addressable_devices_indices_map(x.shape).values()]
    start, stop = min(r.start or 0 for r in rows), max(x.shape[0] if r.stop is None else r.stop for r in rows)
    return jax.make_array_from_process_local_data(sharding, x[start:stop], x.shape)


def fetch(tree: PyTree) -> PyTree:
    """Every array of `tree` as host numpy. In a run of several processes an array that is whole on every
    device is read from a local copy; one split across processes is gathered (every process must call)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def get(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


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
