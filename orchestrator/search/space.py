"""Search spaces: each method declares its default space next to its config
(``Config.search_space()``); a YAML file (``--space FILE``) overrides or extends it.

A space maps a setting key (the same keys ``--set`` takes: ``lr``, ``run.steps``, ``t_max``...)
to one of::

    lr: {loguniform: [1.0e-5, 1.0e-3]}
    weight: {uniform: [0.0, 8.0]}
    t_max: {int: [200, 1000]}          # inclusive; {int: [lo, hi, step]} for a step
    kl_direction: {choice: [forward, reverse]}
    steps: 500                         # a constant: fixed for every trial
    lr: null                           # in a --space file: remove a key of the default space
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from orchestrator.core.config import ConfigError, ResolvedConfig, apply_overrides, read_yaml_mapping

KINDS = ("uniform", "loguniform", "int", "choice")


def validate_param(key: str, spec: Any, where: str) -> Any:
    """Check one entry of a space; returns it unchanged (constants are allowed)."""
    if not isinstance(spec, dict):
        return spec
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where}: {key}: expected one of {{{', '.join(k + ': ...' for k in KINDS)}}} "
                          f"or a constant, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {key}: choice needs a non-empty list, got {args!r}")
        return spec
    if not isinstance(args, list) or len(args) not in (2, 3) or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}: {key}: {kind} needs [low, high] numbers, got {args!r}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise ConfigError(f"{where}: {key}: {kind} needs low < high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: {key}: loguniform needs low > 0, got {lo}")
    if kind == "int" and not all(float(a).is_integer() for a in args):
        raise ConfigError(f"{where}: {key}: int needs integer bounds, got {args!r}")
    if kind != "int" and len(args) == 3:
        raise ConfigError(f"{where}: {key}: only int takes a step, got {args!r}")
    return spec


def corner_values(spec: Any) -> list[Any]:
    """Values at the edges of a parameter's range (used to check that they validate)."""
    if not isinstance(spec, dict):
        return [spec]
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return list(args)
    if kind == "int":
        return [int(args[0]), int(args[1])]
    return [float(args[0]), float(args[1])]


def load_space_file(path: str | Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "space", "setting -> range")


def build_space(base: ResolvedConfig, space_file: str | Path | None = None) -> dict[str, Any]:
    """The method's default space, updated by the file; every key and range edge is validated
    against the method's config and the run settings."""
    from trainers.registry import get_method

    space = dict(get_method(base.method).Config.search_space())
    where = "default search space of " + base.method
    if space_file is not None:
        where = str(space_file)
        for key, spec in load_space_file(space_file).items():
            if spec is None:
                space.pop(key, None)
            else:
                space[str(key)] = spec
    if not space:
        raise ConfigError(f"{where}: the search space is empty")
    for key, spec in space.items():
        if key.startswith("task."):
            raise ConfigError(f"{where}: {key}: a sweep's trials share one task (its data, source and "
                              "reference statistics are prepared once); sweep over method or run settings, "
                              "and run one sweep per task")
        validate_param(key, spec, where)
        for value in corner_values(spec):
            try:
                apply_overrides(base, {key: value}, where=f"{where}:")
            except ConfigError as exc:
                raise ConfigError(f"{where}: {key}: value {value!r} is not valid for this method:\n{exc}") from None
    return space


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    """Ray Tune distributions (OptunaSearch converts them to Optuna's)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            out[key] = spec
            continue
        kind, args = next(iter(spec.items()))
        if kind == "uniform":
            out[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "int":
            step = int(args[2]) if len(args) == 3 else 1
            # Tune's qrandint includes the upper bound (randint would exclude it).
            out[key] = tune.qrandint(int(args[0]), int(args[1]), step)
        else:
            out[key] = tune.choice(list(args))
    return out


def optuna_distributions(space: dict[str, Any]) -> dict[str, Any]:
    """The sweep space's sampled keys (``{uniform|loguniform|int|choice: ...}``, see
    ``orchestrator.search.space``) as Optuna distributions; constants are left out."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            continue
        kind, args = next(iter(spec.items()))
        if kind == "uniform":
            out[key] = FloatDistribution(float(args[0]), float(args[1]))
        elif kind == "loguniform":
            out[key] = FloatDistribution(float(args[0]), float(args[1]), log=True)
        elif kind == "int":
            out[key] = IntDistribution(int(args[0]), int(args[1]), step=int(args[2]) if len(args) == 3 else 1)
        else:
            out[key] = CategoricalDistribution(list(args))
    return out


def pareto_front(trials: list[dict[str, Any]], metrics: list[str], modes: list[str]) -> list[dict[str, Any]]:
    """Non-dominated FINISHED trials: no other trial is at least as good on every objective and
    strictly better on one."""
    sign = [1 if m == "min" else -1 for m in modes]
    pts = [t for t in trials if t["status"] == "FINISHED" and all(t.get(m) is not None for m in metrics)]

    def dominates(a, b) -> bool:
        va = [s * a[m] for s, m in zip(sign, metrics)]
        vb = [s * b[m] for s, m in zip(sign, metrics)]
        return all(x <= y for x, y in zip(va, vb)) and any(x < y for x, y in zip(va, vb))

    return [p for p in pts if not any(dominates(q, p) for q in pts if q is not p)]
