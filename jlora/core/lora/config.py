"""What to adapt and how strongly: `LoraConfig`, target matching and the scaling alpha / r.

A LoRA adapter on a frozen weight W (d_out x d_in) adds a rank-r update::

    h = W x + scaling * B A dropout(x),   A: (r, d_in),  B: (d_out, r)
    scaling = alpha / r            (rsLoRA: alpha / sqrt(r))

GPT-2's adaptable modules, by dotted path (the same path names the weight in the
parameter tree and the adapter in the LoRA tree)::

    h.{i}.attn.c_attn     (D -> 3D, fused q, k, v)
    h.{i}.attn.c_proj     (D -> D)
    h.{i}.mlp.c_fc        (D -> 4D)
    h.{i}.mlp.c_proj      (4D -> D)

and the three output slices of the fused projection, ``h.{i}.attn.c_attn.q`` / ``.k`` /
``.v`` (D -> D each): ``target_modules=("c_attn.q", "c_attn.v")`` is the LoRA paper's
q-and-v-only adaptation.

Two variants change the update or where it starts (see `jlora.core.lora.dora`, `jlora.core.lora.residual`)::

    use_dora=True     DoRA: W' = m * (W + scaling B A) / ||W + scaling B A||, per output feature
    init="pissa"      A, B from W's top-r singular triplets, the base replaced by the residual
    init="pissa_niter_4"   the same from a randomised SVD (4 power iterations)
    init="olora"      A, B from a QR of W, the base replaced by the residual

A target entry is a suffix of the dotted path, as in PEFT (``"c_proj"`` selects both
``attn.c_proj`` and ``mlp.c_proj``), or a regular expression matched against the whole
path (``r"h\\.[0-5]\\.attn\\.c_attn"``).

>>> cfg = LoraConfig(r=8, alpha=16)
>>> scaling(cfg)
2.0
>>> effective_lr(2e-4, cfg)
0.0004
>>> cfg.module_paths(2)
('h.0.attn.c_attn', 'h.1.attn.c_attn')
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence

from flax.core import FrozenDict

from jlora.errors import ConfigError

MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's adaptable modules in a block
QKV = ("q", "k", "v")  # the slices of a fused projection an adapter may target alone
FUSED = ("c_attn",)  # modules whose output is q, k, v side by side (GPT-2's)
ALL_LINEAR = "all-linear"  # PEFT's target: every linear module of the blocks (the LM head is never adapted)
INITS = ("kaiming", "gaussian", "zeros", "pissa", "pissa_niter_<K>", "olora", "eva", "lora_ga", "adalora")
BASE_CHANGING = ("pissa", "olora", "lora_ga")  # inits that move part of W into the adapter (the base: a residual)
FROM_DATA = ("eva", "lora_ga")  # inits computed from the run's first training batches (`jlora.training.run.build`)
LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")
_REGEX_CHARS = set("\\[](){}*+?|^$")


def is_regex(entry: str) -> bool:
    """Whether a target entry is a regular expression (else a dotted path suffix)."""
    return bool(_REGEX_CHARS & set(entry))


def adaptable_paths(params: Mapping | int | Sequence[str]) -> tuple[str, ...]:
    """Every module path LoRA can target in a model, slices of fused projections included.

    `params` is the model's parameter tree (or its shapes): every module holding a 2-D ``kernel``
    is a linear layer LoRA can adapt, in block order (``h.2`` before ``h.10``); or the module paths
    themselves; an int is the shorthand for an n-layer GPT-2.

    >>> adaptable_paths(1)[:5]
    ('h.0.attn.c_attn', 'h.0.attn.c_attn.q', 'h.0.attn.c_attn.k', 'h.0.attn.c_attn.v', 'h.0.attn.c_proj')
    """
    if isinstance(params, int):
        modules = [f"h.{i}.{m}" for i in range(params) for m in MODULES]
    elif not isinstance(params, Mapping):
        modules = list(params)
    else:
        modules = sorted(_kernel_modules(params, ""), key=path_order)
    paths = []
    for m in modules:
        paths.append(m)
        if m.rsplit(".", 1)[-1] in FUSED:
            paths.extend(f"{m}.{s}" for s in QKV)
    return tuple(paths)


def _kernel_modules(node: Mapping, prefix: str) -> list[str]:
    found = []
    for name, child in node.items():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, Mapping):
            found += _kernel_modules(child, path)
        elif name == "kernel" and len(getattr(child, "shape", ())) == 2:
            found.append(prefix)
    return found


def path_order(path: str) -> tuple:
    """Sort key of a module path: numeric parts as numbers (``h.2`` before ``h.10``), the rest by name."""
    return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in path.split("."))


def block_of(path: str) -> int | None:
    """The block index of a module path (its first numeric part: ``h.3.attn.c_attn`` -> 3), or None."""
    return next((int(x) for x in path.split(".") if x.isdigit()), None)


def module_kind(path: str) -> str:
    """A module path without its block prefix: ``h.3.attn.c_attn.q`` -> ``attn.c_attn.q``."""
    parts = path.split(".")
    i = next((k for k, x in enumerate(parts) if x.isdigit()), -1)
    return ".".join(parts[i + 1 :])


def _matches(entry: str, path: str) -> bool:
    if is_regex(entry):
        return re.fullmatch(entry, path) is not None
    return path == entry or path.endswith("." + entry)


def pattern_value(pattern: Mapping[str, float], path: str, default):
    """PEFT's rule: a key applies to a module whose name ends in it (the first key wins)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", path):
            return value
    return default


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check(ok, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class EvaConfig:
    """EVA's settings (``init="eva"``; `jlora.core.lora.eva`), PEFT's ``EvaConfig`` with its defaults.

    Attributes:
      rho: each adapted layer is offered round(r * rho) components (>= 1; 1: no redistribution).
      tau: a component has converged when its cosine with the previous batch's estimate is >= tau.
      whiten: divide each component by the square root of its singular value.
      adjust_scaling_factors: alpha follows the new rank (alpha * r_new / r), so the scaling stays alpha / r.
      use_label_mask: only the positions of completion tokens feed the PCA (PEFT's label mask); else every token.
      batches: the most training batches the PCA reads (jlora's; PEFT cycles its loader until convergence).
    """

    rho: float = 2.0
    tau: float = 0.99
    whiten: bool = False
    adjust_scaling_factors: bool = True
    use_label_mask: bool = True
    batches: int = 100

    def __post_init__(self):
        _check(_is_number(self.rho) and self.rho >= 1.0, f"lora.eva.rho must be >= 1, got {self.rho!r}")
        _check(_is_number(self.tau) and 0.0 <= self.tau <= 1.0, f"lora.eva.tau must be in [0, 1], got {self.tau!r}")
        _check(_is_int(self.batches) and self.batches > 0, f"lora.eva.batches must be > 0, got {self.batches!r}")
        for name in ("whiten", "adjust_scaling_factors", "use_label_mask"):
            _check(isinstance(getattr(self, name), bool), f"lora.eva.{name} must be true or false")


@dataclasses.dataclass(frozen=True)
class LoraGAConfig:
    """LoRA-GA's settings (``init="lora_ga"``; `jlora.core.lora.lora_ga`), PEFT's ``LoraGAConfig`` with its defaults.

    Attributes:
      direction: which of the gradient's 2r singular vectors A and B take: "ArB2r" (A the first r right
        vectors, B the left vectors r..2r), "A2rBr", "ArBr" (alternating), "random".
      scale: "stable" (B times d_out^(1/4) / sqrt(stable_gamma)), "weight_svd", "gd_scale" or "unit".
      stable_gamma: gamma of the "stable" scale.
      batches: training batches whose full-weight gradients are averaged (jlora's; PEFT's is the user's loop).
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16
    batches: int = 4

    def __post_init__(self):
        _check(self.direction in LORA_GA_DIRECTIONS, f"lora.lora_ga.direction must be one of {LORA_GA_DIRECTIONS}")
        _check(self.scale in LORA_GA_SCALES, f"lora.lora_ga.scale must be one of {LORA_GA_SCALES}")
        _check(_is_number(self.stable_gamma) and self.stable_gamma > 0, "lora.lora_ga.stable_gamma must be > 0")
        _check(_is_int(self.batches) and self.batches > 0, f"lora.lora_ga.batches must be > 0, got {self.batches!r}")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which modules get a rank-`r` adapter and how the update is scaled.

    Attributes:
      r: rank of every adapter (unless `rank_pattern` overrides it).
      alpha: scale numerator; the update is multiplied by alpha / r.
      dropout: dropout rate on the input of the LoRA path only (training mode).
      target_modules: suffixes or regular expressions of module paths (see `jlora.core.lora.config`).
      layers: adapt only these block indices (None: every block).
      rslora: scale by alpha / sqrt(r) instead of alpha / r.
      init: how A and B start. B = 0 with A "kaiming" (PEFT's default), "gaussian"
        (N(0, 1/r^2), the LoRA paper's) or "zeros" (A = B = 0, for debugging only); or from
        the weight itself, with the base replaced by the residual W - scaling B A so the model
        is unchanged at step 0: "pissa" (top-r SVD), "pissa_niter_K" (randomised SVD, K power
        iterations), "olora" (QR). Such adapters are made by `jlora.init_adapters`. "adalora": AdaLoRA's
        SVD-shaped adapter (A, B ~ N(0, 0.02), E = 0, scaling alpha / (r + 1e-5); `adalora`). Two read the
        training data (a run makes them before step 0, `jlora.training.run.build.initial_lora`): "eva"
        (A from a PCA of each layer's inputs, the ranks redistributed; `eva`) and "lora_ga" (A, B from the
        SVD of the averaged gradient of W, on a residual base; `lora_ga`).
      rank_pattern, alpha_pattern: per-module overrides, keyed like PEFT's.
      use_dora: DoRA, a trained magnitude per output feature of each adapted module.
      eva: EVA's settings (with init "eva").
      lora_ga: LoRA-GA's settings (with init "lora_ga").
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("c_attn",)
    layers: tuple[int, ...] | None = None
    rslora: bool = False
    init: str = "kaiming"
    rank_pattern: Mapping[str, int] = FrozenDict()
    alpha_pattern: Mapping[str, float] = FrozenDict()
    use_dora: bool = False
    eva: EvaConfig = EvaConfig()
    lora_ga: LoraGAConfig = LoraGAConfig()

    def __post_init__(self):
        for name, kind in (("eva", EvaConfig), ("lora_ga", LoraGAConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):  # from a dict (to_dict's, a checkpoint's meta)
                fields = {f.name for f in dataclasses.fields(kind)}
                _check(set(value) <= fields, f"unknown lora.{name} key(s) {sorted(set(value) - fields)}")
                object.__setattr__(self, name, kind(**value))
            _check(isinstance(getattr(self, name), kind), f"lora.{name} must be a mapping of {kind.__name__}'s keys")
        _check_types(self)
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("target_modules", tuple(targets))
        set_("layers", None if self.layers is None else tuple(int(i) for i in self.layers))
        set_("rank_pattern", FrozenDict(self.rank_pattern))
        set_("alpha_pattern", FrozenDict(self.alpha_pattern))
        _check(isinstance(self.r, int) and self.r > 0, f"LoRA rank r must be a positive integer, got r={self.r!r}")
        _check(0 < self.alpha < math.inf, f"LoRA alpha must be a finite number > 0, got alpha={self.alpha!r}")
        _check(0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got dropout={self.dropout!r}")
        _check(
            isinstance(self.init, str) and (self.init in INITS or re.fullmatch(r"pissa_niter_\d+", self.init)),
            f"unknown LoRA init {self.init!r}; valid: {', '.join(INITS)}",
        )
        _check(len(self.target_modules) > 0, "target_modules is empty; name the modules to adapt (e.g. c_attn, q_proj)")
        for t in self.target_modules:
            if is_regex(t):
                try:
                    re.compile(t)
                except re.error as e:
                    raise ConfigError(f"LoRA target {t!r} is not a valid regular expression ({e})") from None
        slice_paths = [p for p in adaptable_paths(48) if p.rsplit(".", 1)[1] in QKV]
        slices = [t for t in self.target_modules if any(_matches(t, p) for p in slice_paths)]
        _check(
            not (self.use_dora and slices),
            f"use_dora with q/k/v slice targets {slices}: DoRA normalises a module's whole output features; "
            "target c_attn instead",
        )
        for k, v in self.rank_pattern.items():
            _check(isinstance(v, int) and v > 0, f"rank_pattern[{k!r}] must be a positive integer, got {v!r}")
        for k, v in self.alpha_pattern.items():
            _check(0 < v < math.inf, f"alpha_pattern[{k!r}] must be a finite number > 0, got {v!r}")

    @property
    def changes_base(self) -> bool:
        """Whether the init moves part of W into the adapter, so the base becomes a residual (PiSSA, OLoRA)."""
        return self.init.startswith(BASE_CHANGING)

    @property
    def from_data(self) -> bool:
        """Whether the init reads the training data (EVA, LoRA-GA): a run makes such adapters, not `init_lora`."""
        return self.init in FROM_DATA

    @property
    def power_iterations(self) -> int | None:
        """K of "pissa_niter_K" (a randomised SVD), None for the exact one and other inits."""
        return int(self.init.rsplit("_", 1)[1]) if self.init.startswith("pissa_niter_") else None

    def module_paths(self, params: Mapping | int | Sequence[str]) -> tuple[str, ...]:
        """The dotted paths of the modules this config adapts in a model (its parameter tree, or the
        number of blocks of a GPT-2; see `adaptable_paths`).

        Raises ConfigError for a target no module of the model matches, naming the valid ones.
        """
        every = adaptable_paths(params)
        blocks = sorted({b for b in map(block_of, every) if b is not None})
        if self.layers is not None:
            bad = [i for i in self.layers if i not in blocks]
            _check(not bad, f"LoRA layers {bad} out of range; valid: 0..{len(blocks) - 1}")
        for t in self.target_modules:
            ok = t == ALL_LINEAR or any(_matches(t, p) for p in every)
            _check(ok, f"unknown LoRA target {t!r}; valid: {_valid_targets(every)}")
        chosen = []
        for p in every:
            if self.layers is not None and block_of(p) not in self.layers:
                continue
            whole = ALL_LINEAR in self.target_modules and p.rsplit(".", 1)[-1] not in QKV and block_of(p) is not None
            if whole or any(_matches(t, p) for t in self.target_modules):
                chosen.append(p)
        for p in chosen:
            parent = p.rsplit(".", 1)[0]
            _check(
                not (p.endswith(tuple("." + s for s in QKV)) and parent in chosen),
                f"LoRA targets overlap: {parent} and its slice {p}; choose the fused module or its slices",
            )
        return tuple(chosen)

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at `path` (`rank_pattern` first, then `r`)."""
        return int(pattern_value(self.rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter at `path` (`alpha_pattern` first, then `alpha`)."""
        return float(pattern_value(self.alpha_pattern, path, self.alpha))

    def scaling_for(self, path: str, r: int | None = None) -> float:
        """alpha / r (or alpha / sqrt(r)) for the adapter at `path`; `r` defaults to `rank_for`.

        AdaLoRA's (init "adalora") is PEFT's lora_alpha / (init_r + 1e-5), whatever its pruning leaves.
        """
        r = self.rank_for(path) if r is None else r
        if self.init == "adalora":
            return self.alpha_for(path) / (r + 1e-5)
        return _scale(self.alpha_for(path), r, self.rslora)

    def replace(self, **changes) -> LoraConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able dict; `LoraConfig.from_dict` inverts it."""
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["rank_pattern"] = dict(self.rank_pattern)
        d["alpha_pattern"] = dict(self.alpha_pattern)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> LoraConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        _check(not unknown, f"unknown LoraConfig key(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)


def layers_and_kinds(paths) -> dict[int, set[str]]:
    """{block index: {module kinds}} of module paths ``<prefix>.{i}.{kind}``."""
    by_layer: dict[int, set[str]] = {}
    for p in paths:
        by_layer.setdefault(block_of(p), set()).add(module_kind(p))
    return by_layer


def short_names(kinds) -> list[str]:
    """Module kinds ("attn.c_proj", ...) as the shortest suffixes that select exactly them.

    >>> short_names({"attn.c_attn", "attn.c_proj", "mlp.c_proj"}), short_names({"mlp.c_proj", "attn.c_attn"})
    (['c_attn', 'c_proj'], ['c_attn', 'mlp.c_proj'])
    """
    known = list(dict.fromkeys([*MODULES, *sorted(kinds)]))  # GPT-2's c_proj is two modules; others are one
    names = []
    for kind in sorted(kinds, key=known.index):
        last = kind.split(".")[-1]
        same_last = [k for k in known if k.split(".")[-1] == last]
        names.append(last if all(k in kinds for k in same_last) else kind)
    return sorted(set(names), key=names.index)


def targets_for(paths, every_layer: bool = True) -> dict:
    """The `LoraConfig` target fields (``target_modules``, ``layers``) that select exactly these module paths.

    The same module kinds in every block they name: short names, with ``layers`` None when `every_layer`
    (the blocks named are all the model's) and they are blocks 0, 1, ..., else the blocks named; other
    paths: the paths themselves.

    >>> targets_for(["h.0.attn.c_attn", "h.1.attn.c_attn"])
    {'target_modules': ('c_attn',), 'layers': None}
    >>> exact = targets_for(["h.0.attn.c_attn", "h.1.mlp.c_fc"])["target_modules"]   # regular expressions
    >>> [[re.fullmatch(t, p) is not None for p in ("h.0.attn.c_attn", "h.1.mlp.c_fc")] for t in exact]
    [[True, False], [False, True]]
    """
    by_layer = layers_and_kinds(paths)
    kinds = set.union(*by_layer.values())
    whole = all(k.rsplit(".", 1)[-1] not in QKV for k in kinds)
    if None not in by_layer and whole and all(k == kinds for k in by_layer.values()):
        every = every_layer and sorted(by_layer) == list(range(len(by_layer)))
        return {"target_modules": tuple(short_names(kinds)), "layers": None if every else tuple(sorted(by_layer))}
    return {"target_modules": tuple(re.escape(p) for p in paths), "layers": None}


def _check_types(cfg: LoraConfig) -> None:
    """Each field's type, so a wrong one is a one-line ConfigError rather than a TypeError later."""
    targets = (cfg.target_modules,) if isinstance(cfg.target_modules, str) else cfg.target_modules
    checks = {
        "r": (_is_int(cfg.r), "an integer"),
        "alpha": (_is_number(cfg.alpha), "a number"),
        "dropout": (_is_number(cfg.dropout), "a number"),
        "target_modules": (isinstance(targets, tuple | list) and all(isinstance(t, str) for t in targets), "names"),
        "layers": (cfg.layers is None or all(_is_int(i) for i in cfg.layers), "None or block indices"),
        "rslora": (isinstance(cfg.rslora, bool), "true or false"),
        "init": (isinstance(cfg.init, str), "a name"),
        "rank_pattern": (isinstance(cfg.rank_pattern, Mapping), "a mapping {module: rank}"),
        "alpha_pattern": (
            isinstance(cfg.alpha_pattern, Mapping) and all(_is_number(v) for v in cfg.alpha_pattern.values()),
            "a mapping {module: alpha}",
        ),
    }
    for name, (ok, what) in checks.items():
        _check(ok, f"LoRA {name} must be {what}, got {name}={getattr(cfg, name)!r}")


def _valid_targets(paths) -> str:
    kinds = list(dict.fromkeys(module_kind(p) for p in paths))
    block = next((p for p in paths if block_of(p) is not None), "h.0")
    prefix = block[: block.index(f".{block_of(block)}")]
    return ", ".join(kinds) + f", {ALL_LINEAR} (or a suffix / regex of {prefix}.<i>.<module>)"


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def scaling(cfg: LoraConfig) -> float:
    """The update's scale: alpha / r, or alpha / sqrt(r) with rsLoRA.

    >>> [scaling(LoraConfig(r=r, alpha=2 * r)) for r in (4, 8, 16, 32)]
    [2.0, 2.0, 2.0, 2.0]
    """
    return _scale(cfg.alpha, cfg.r, cfg.rslora)


def effective_lr(lr: float, cfg: LoraConfig) -> float:
    """The source document's effective learning rate, lr * scaling (lr * alpha / r).

    >>> [round(effective_lr(2e-4, LoraConfig(r=8, alpha=a)), 10) for a in (8, 16, 32)]
    [0.0002, 0.0004, 0.0008]
    """
    return lr * scaling(cfg)


def alpha_for_rank(cfg: LoraConfig, r: int) -> float:
    """The alpha that keeps `cfg`'s scaling (so its effective lr) unchanged at rank `r`.

    >>> alpha_for_rank(LoraConfig(r=8, alpha=16), 32)
    64.0
    >>> alpha_for_rank(LoraConfig(r=4, alpha=4, rslora=True), 16)
    8.0
    """
    _check(isinstance(r, int) and r > 0, f"rank must be a positive integer, got r={r!r}")
    return float(scaling(cfg) * (math.sqrt(r) if cfg.rslora else r))
