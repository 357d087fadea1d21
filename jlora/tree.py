"""Nested-dict pytrees addressed by dotted paths: the one home of jlora's tree plumbing.

jlora's trees are plain nested dicts whose keys follow the checkpoint (``params["h"]["0"]
["attn"]["c_attn"]["kernel"]``), so one dotted path names a leaf or a module everywhere::

    get_path(params, "h.0.attn.c_attn")          # the module's subtree {"kernel", "bias"}
    leaves_by_path(params)                       # {"h.0.attn.c_attn.kernel": array, ...}
    replace_paths(params, {"ln_f.scale": x})     # a new tree with those leaves swapped
    unflatten({"h.0.attn.c_attn": {...}})        # dotted keys -> the nested dict

A trainable partition has None where a leaf is frozen; `prune` drops those (what a checkpoint
stores), `restore` puts saved leaves back into such a template, and `overlay` puts a few
trained leaves (an adapter's ``modules_to_save``) into a full tree, checking their shapes:

>>> prune({"ln_f": {"scale": None, "bias": 1}, "wte": None})
{'ln_f': {'bias': 1}}
>>> restore({"ln_f": {"scale": None, "bias": 0}}, {"ln_f": {"bias": 5}})
{'ln_f': {'scale': None, 'bias': 5}}
>>> overlay({"ln_f": {"scale": 1, "bias": 0}, "wte": 2}, {"ln_f": {"bias": 5}})
{'ln_f': {'scale': 1, 'bias': 5}, 'wte': 2}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jlora.errors import CheckpointError

PyTree = Any


def key_name(key: Any) -> str:
    """One entry of a JAX key path as text: a dict key, a sequence index or an attribute name."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_names(key_path: tuple) -> tuple[str, ...]:
    """A JAX key path as names, e.g. ("h", "0", "attn", "c_attn", "kernel")."""
    return tuple(key_name(k) for k in key_path)


def dotted(key_path: tuple) -> str:
    """A JAX key path as one dotted path, e.g. "h.0.attn.c_attn.kernel"."""
    return ".".join(path_names(key_path))


def leaves_by_path(tree: PyTree) -> dict[str, Any]:
    """{dotted path: leaf} for every leaf of `tree`, in tree order."""
    return {dotted(kp): leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def get_path(tree: Mapping, path: str) -> Any:
    """The subtree (or leaf) at a dotted path, e.g. ``get_path(params, "h.0.attn.c_attn")``."""
    for name in path.split("."):
        tree = tree[name]
    return tree


def has_path(tree: Mapping, path: str) -> bool:
    """Whether `tree` has a subtree or leaf at the dotted `path`."""
    for name in path.split("."):
        if not isinstance(tree, Mapping) or name not in tree:
            return False
        tree = tree[name]
    return True


def replace_paths(tree: PyTree, values: Mapping[str, Any]) -> PyTree:
    """`tree` with the leaves at the dotted paths in `values` replaced; every other leaf is the same object."""
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: values.get(dotted(kp), leaf), tree)


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{dotted path: value} -> the nested dict that holds each value at its path."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, last = path.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return tree


def prune(tree: PyTree) -> PyTree:
    """`tree` without its None leaves and the dicts they leave empty."""
    if isinstance(tree, Mapping):
        kept = {k: prune(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None and not (isinstance(v, Mapping) and not v)}
    return tree


def restore(template: PyTree, saved: Mapping) -> PyTree:
    """`saved` (a pruned tree) put back into `template`'s structure: None stays None, the rest from `saved`.

    The inverse of `prune` on the template's non-None leaves; a leaf `saved` lacks becomes {}
    (so a missing saved leaf is visible rather than silently the template's).
    """
    if isinstance(template, Mapping):
        return {k: restore(v, saved.get(k, {}) if isinstance(saved, Mapping) else {}) for k, v in template.items()}
    return None if template is None else saved


def overlay(tree: Mapping, leaves: Mapping | None) -> dict:
    """`tree` with the leaves of the (partial) tree `leaves` put in place, shapes checked.

    Raises CheckpointError naming a leaf `tree` does not have or whose shape differs.
    """
    out = dict(tree)
    for name, value in (leaves or {}).items():
        if value is None:
            continue
        if name not in tree:
            raise CheckpointError(f"trained base leaf {name!r} is not in the base model")
        if isinstance(value, Mapping):
            out[name] = overlay(tree[name], value)
            continue
        if np.shape(value) != np.shape(tree[name]):
            raise CheckpointError(
                f"trained base leaf {name!r} has shape {np.shape(value)}, the base {np.shape(tree[name])}"
            )
        out[name] = value
    return out


def all_finite(tree: PyTree) -> bool:
    """Whether every leaf of `tree` holds only finite numbers (one device-to-host transfer)."""
    checks = [jax.numpy.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return bool(np.all(jax.device_get(checks))) if checks else True
