"""Task files, run settings and the resolved configuration of one run.

A task file (``tasks/*.yaml``) names the source model, the few-shot target data, an optional
reference set for metrics and the resolution. It is parsed with ``yaml.safe_load`` and validated
with pydantic; every error names the file, the key and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.core.errors import ConfigError, InputError  # noqa: F401 (re-exported: the errors users cause)
from orchestrator.core.names import NAME_MAX, DerivedName, check_name, did_you_mean
from trainers.registry import SOURCE_FAMILIES, check_family, get_method, method_family

if TYPE_CHECKING:  # the methods (and torch) are imported when a method is used, not to read a task
    from trainers.base import MethodConfig


class _Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `steps_per_x: .nan` parse as YAML floats and pass `gt=0`;
    # every float field of a task or run settings must be a finite number
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PretrainSpec(_Strict):
    """How the project's own source model is pretrained when ``source.model`` is ``pretrained``."""

    data: str = Field("synthetic:source", description="source-domain images (any data URI)")
    count: int = Field(4096, ge=1, description="source images used for pretraining")
    # Sized for the embedded default, a demo that finishes in 10 minutes on 2 CPU cores: about 4.5
    # minutes at 32². Measured (fid_domain of 256 samples against 1,024 source images, 2 threads):
    # tiny/2,000 steps/lr 1e-3 0.49 in 250 s; tiny/3,000/3e-4 0.50 in 510 s; small/1,500/3e-4
    # 0.48 in 450 s. All are weak sources (blurry shapes on grey): a real study pretrains a larger
    # preset for longer (`orchestrate pretrain ddpm` with its own task file), best on a GPU.
    preset: str = Field("tiny", description="network shape: tiny | small | base")
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float | None = Field(1e-3, gt=0, description="null: the pretrainer's own default")
    seed: int = 0
    encoder_steps: int = Field(300, ge=1, description="SimCLR steps of the domain encoder (metrics)")
    encoder_data: list[str] = Field(default_factory=list, description="more (unlabelled) data the domain "
                                    "encoder also trains on, e.g. the target's reference images, so that the "
                                    "*_domain metrics see a domain unlike the source (data URIs)")
    pretrainer: str | None = Field(None, description="which pretrainer (trainers.registry.PRETRAINERS); "
                                   "null: the family's plain one")


class SourceSpec(_Strict):
    family: Literal["ddpm", "stylegan2"] = Field("ddpm", description="generator family of the source model")
    model: str = Field(
        "pretrained",
        description="'pretrained' = the project's own source model (trained once from `pretrain` and "
        "cached), 'builtin' = the one this repository ships for the family and resolution (the default of a "
        "task file that gives neither `model` nor `pretrain` where one is shipped), or a diffusers folder, a "
        ".pt checkpoint, or a Hub id already on disk",
    )
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)
    resize_to_source: bool = Field(False, description="true: the task takes the source model's resolution "
                                   "(its images are resized to it); false: a different resolution is an error")


class DataSpec(_Strict):
    data: str = Field(..., description="synthetic:<domain>, an image folder, a .parquet file, or s3://...")
    image_column: str = "image"
    storage_options: dict[str, Any] | None = None


class TargetSpec(DataSpec):
    shots: int = Field(10, ge=1, description="how many target images the method may see")
    seed: int = Field(0, description="which shots are picked (and how synthetic shots are drawn)")


class ReferenceSpec(DataSpec):
    count: int | None = Field(None, ge=2, description="images of the reference set (all when omitted)")
    seed: int = Field(1, description="picks the reference images; differs from the shots' by default")


class TaskConfig(_Strict):
    # a task file's own name is checked against NAME_MAX in load_task; a sequence's tasks are
    # composed (SEQUENCE-K-TASK), hence the longer limit here (orchestrator.core.names)
    name: DerivedName = Field(...)
    resolution: int = Field(32, ge=8, le=1024)
    source: SourceSpec = Field(default_factory=SourceSpec)
    target: TargetSpec
    reference: ReferenceSpec | None = None

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two (got {v})")
        return v


class RunSettings(_Strict):
    """Engineering settings of one run (not the method's science)."""

    steps: int = Field(300, ge=1, description="optimisation steps")
    report_every: int = Field(50, ge=1, description="steps between reports (metrics to MLflow and the scheduler)")
    checkpoint_every: int | None = Field(
        None, ge=1, description="steps between checkpoints (a multiple of report_every); default: every "
        "report for a single run, ASHA's rungs and the end for a sweep trial")
    sample_every: int = Field(100, ge=1, description="steps between sample grids in MLflow")
    grid_size: int = Field(16, ge=1, description="images in a sample grid")
    grid_sample_steps: int = Field(25, ge=1, description="sampling steps for the periodic grids")
    seed: int = 0
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel)")
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs (and torch threads) per worker; default: with GPUs 1, on CPU the "
        "cluster's cores shared among the workers, at most one node's (orchestrator.runtime.launch.default_worker_cpus)")
    gpus_per_worker: float = Field(1.0, gt=0, description="only with use_gpu; fractions share a GPU")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=-1, description="restarts of a run whose worker died (from its last "
                              "checkpoint, same MLflow run); -1 = unlimited")
    start_timeout_s: float = Field(300.0, gt=0, description="a worker group that cannot start within this "
                                   "time fails the run (e.g. no node can ever hold it)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast of the network forwards: auto = the method's choice on CUDA "
        "(bf16 for diffusion, fp32 for StyleGAN2), fp32 on the CPU")
    channels_last: bool = Field(False, description="channels_last memory format for the networks and batches")
    compile: bool = Field(False, description="torch.compile the method's networks")
    tf32: bool = Field(True, description="TF32 matmuls/convolutions on Ampere+ GPUs")
    metrics: list[str] = Field(["domain"], description="feature networks for the metrics: domain "
                               "(the project's own encoder), inception, lpips_vgg, lpips_alex")
    eval_every: int | None = Field(None, ge=0, description="steps between evaluations (a multiple of "
                                   "report_every; 0 = only at the end); default: sized to the run, its "
                                   "middle, one more point per 500 steps from 1,000 on, or in an ASHA "
                                   "sweep each rung (orchestrator.runtime.job.eval_schedule)")
    # Periodic evaluations (the source's baseline at step 0, the points of eval_schedule, ASHA's
    # rungs) watch a run and let a scheduler compare trials at one budget; the final evaluation
    # measures the result, the protocol of record. They share the sampler (its step count changes
    # what the samples look like: the demo's 300-step model, 256 samples, target_rate 0.11 at 50 DDIM
    # steps, 0.33 at 25) and differ only in the sample count: 64 periodic, 256 final. On 2 CPU
    # cores a 32-px DDPM evaluation of 64 samples at 50 DDIM steps takes ~9 s, of 256 ~40 s, as
    # long as ~400 training steps (README "Every method's defaults"). Rates and diversity agree
    # between the two counts up to their spread; FID and KID carry a bias that grows as the count
    # falls (small with the domain encoder: README "Using an adapted model").
    eval_samples: int = Field(64, ge=2, description="samples per periodic evaluation (step 0, the "
                              "schedule's points, ASHA's rungs)")
    eval_sample_steps: int | None = Field(None, ge=1, description="sampling steps per evaluation (diffusion); "
                                          "default: the method's own (its sample_steps)")
    final_eval_samples: int | None = Field(256, ge=2, description="samples of the final evaluation, the "
                                           "protocol of record (None = eval_samples)")
    final_eval_sample_steps: int | None = Field(None, ge=1, description="default: eval_sample_steps")
    truth_check: bool = Field(True, description="train the task's truth classifier (target vs the source's "
                              "samples vs neither) once per task and source, and record target_rate at every "
                              "evaluation (orchestrator.metrics.truth)")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        known = ("domain", "inception", "lpips_vgg", "lpips_alex")
        bad = [m for m in v if m not in known]
        if bad:
            raise ValueError(f"unknown feature network(s) {bad}; expected some of {list(known)}")
        return v

    @model_validator(mode="after")
    def _eval_on_reports(self) -> "RunSettings":
        if self.eval_every and self.eval_every % self.report_every:
            raise ValueError(f"eval_every ({self.eval_every}) must be a multiple of report_every "
                             f"({self.report_every}): metrics are evaluated when they are reported")
        if self.checkpoint_every and self.checkpoint_every % self.report_every:
            raise ValueError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of report_every "
                             f"({self.report_every}): checkpoints are taken with a report")
        return self


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def format_validation_error(where: str, exc: ValidationError, model: type[BaseModel] | None = None,
                            prefix: str = "") -> str:
    """``where: key: what was expected (got value)``: one line for one error, else a header line
    and one indented line per error. A validator's own message that already shows the value
    (``(got 48)``) is not given the value twice; pydantic's ``Value error, `` prefix is dropped."""
    lines = []
    for err in exc.errors():
        key = prefix + _format_loc(err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1]) if model else None
            name = str(err["loc"][-1]) if err["loc"] else ""
            hint = (did_you_mean(name, allowed) + f"; expected one of: {', '.join(allowed)}") if allowed else ""
            lines.append(f"{key}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            got = "" if "(got " in msg else f" (got {_short_repr(err.get('input'))})"
            lines.append(f"{key}: {msg}{got}")
    if len(lines) == 1:
        return f"{where}: {lines[0]}"
    return "\n".join([f"{where}: invalid configuration", *(f"  {line}" for line in lines)])


def _short_repr(value: Any) -> str:
    """A value as an error message shows it: its repr, cut when long (a 300-character name)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann] + list(getattr(ann, "__args__", ()))
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            return None
        model = sub
    return sorted(model.model_fields)


def _resolve_local(uri: str, base: Path) -> str:
    """Relative local paths in a task file are relative to the task file's folder."""
    if ":" in uri.split("/")[0] or Path(uri).is_absolute():  # synthetic:..., s3://..., C:\...
        return uri
    return str((base / uri).resolve())


def read_yaml_mapping(path: str | Path, kind: str, keys: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; errors name the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None and kind == "space":
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {keys}, got {type(data).__name__}")
    return data


DEFAULT_TASK = "synthetic:sketch"


# The project's own StyleGAN2 source on the synthetic domain (tiny shape, ~4 minutes on 2 CPUs).
GAN_PRETRAIN = PretrainSpec(preset="tiny", steps=3000, batch_size=16, lr=None)


def builtin_task(domain: str, family: str = "ddpm") -> TaskConfig:
    """The embedded default tasks: ten shots of a synthetic target domain, the source model this
    repository ships for the synthetic source domain (a DDPM or a StyleGAN2, ``trainers/builtin``;
    where none is shipped, the project's own pretrained one), 1,000 reference images."""
    from trainers.builtin import shipped_source
    from trainers.data import TARGET_DOMAINS

    if domain not in TARGET_DOMAINS:
        choices = ["synthetic:" + d for d in TARGET_DOMAINS]
        raise ConfigError(f"unknown built-in task synthetic:{domain}{did_you_mean('synthetic:' + domain, choices)}; "
                          f"expected one of {', '.join(choices)}")
    source = SourceSpec(family=family, pretrain=GAN_PRETRAIN if family == "stylegan2" else PretrainSpec())
    if shipped_source(family, 32):
        source.model = "builtin"
    suffix = "" if family == "ddpm" else f"-{family}"
    return TaskConfig(name=f"synthetic-{domain}{suffix}", source=source,
                      target=TargetSpec(data=f"synthetic:{domain}"),
                      reference=ReferenceSpec(data=f"synthetic:{domain}", count=1000))


def load_task(path: str | Path, family: str = "ddpm") -> TaskConfig:
    """A task file, or ``synthetic:<domain>`` for a built-in task (its source of ``family``)."""
    if isinstance(path, str) and path.startswith("synthetic:"):
        return builtin_task(path.split(":", 1)[1], family)
    path = Path(path)
    raw = read_yaml_mapping(path, "task", "keys (name, resolution, source, target, ...)")
    # a task file's name (or its file name) is chosen by someone: the shorter limit, so that the
    # names composed from it (METHOD-TASK-HASH, sweep-METHOD-TASK-TIME) fit (orchestrator.core.names)
    if "name" not in raw:
        raw["name"] = check_name(path.stem, f"{path}: name (taken from the file name; set `name:` in the file)",
                                 NAME_MAX)
    elif isinstance(raw["name"], str):
        check_name(raw["name"], f"{path}: name", NAME_MAX)
    try:
        task = TaskConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc, TaskConfig)) from None
    source_raw = raw.get("source") if isinstance(raw.get("source"), dict) else {}
    if "model" not in source_raw and "pretrain" not in source_raw:
        from trainers.builtin import shipped_source

        # A task that names no source model and describes no pretraining adapts the source this
        # repository ships for its family and resolution (trained on the synthetic source domain,
        # see trainers/builtin), rather than pretraining a new tiny one first. A `pretrain:` block,
        # or `model: pretrained`, asks for the project's own pretraining instead.
        if shipped_source(task.source.family, task.resolution):
            task.source.model = "builtin"
    base = path.parent.resolve()
    task.target.data = _resolve_local(task.target.data, base)
    if task.reference is not None:
        task.reference.data = _resolve_local(task.reference.data, base)
    task.source.pretrain.data = _resolve_local(task.source.pretrain.data, base)
    if task.source.model != "pretrained":
        local = _resolve_local(task.source.model, base)
        if Path(local).exists():
            task.source.model = local
    return task


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "run.steps=20"]`` -> ``{"lr": 1e-4, "run.steps": 20}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {pair!r}: value is not valid YAML: {exc}") from exc
    return out


class ResolvedConfig(BaseModel):
    """Everything that defines one run: it is logged to MLflow as params and as ``config.yaml``,
    and ``orchestrate train --config`` accepts it back."""

    model_config = ConfigDict(extra="forbid")

    method: str
    task: TaskConfig
    method_config: dict[str, Any]
    run: RunSettings = Field(default_factory=RunSettings)

    def method_settings(self) -> MethodConfig:
        return get_method(self.method).Config.model_validate(self.method_config)

    def public_dump(self) -> dict[str, Any]:
        """The config as JSON-able data with every secret redacted (orchestrator.core.redact): what is
        recorded anywhere (MLflow params, config.yaml, sweep.json, Tune's state)."""
        from orchestrator.core.redact import redact

        return redact(self.model_dump(mode="json"))

    def fingerprint(self) -> str:
        blob = json.dumps(self.public_dump(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def default_name(self) -> str:
        return f"{self.method}-{self.task.name}-{self.fingerprint()}"

    def flat_params(self) -> dict[str, str]:
        return flatten(self.public_dump())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.public_dump(), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)
    return out


def apply_overrides(config: ResolvedConfig, overrides: dict[str, Any], where: str = "--set") -> ResolvedConfig:
    """Apply ``key=value`` overrides. A bare key is looked up in the method's config, then in the
    run settings; ``method.KEY``, ``run.KEY`` and ``task.a.b`` address a section explicitly."""
    data = config.model_dump(mode="json")
    method_fields = set(get_method(config.method).Config.model_fields)
    run_fields = set(RunSettings.model_fields)
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] in ("method", "method_config") and len(parts) == 2:
            section, name = "method_config", parts[1]
        elif parts[0] == "run" and len(parts) == 2:
            section, name = "run", parts[1]
        elif parts[0] == "task" and len(parts) > 1:
            node = data["task"]
            for p in parts[1:-1]:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"{where} {key}: task has no section {p!r}")
                node = node[p]
            node[parts[-1]] = value
            continue
        elif len(parts) == 1 and key in method_fields:
            section, name = "method_config", key
        elif len(parts) == 1 and key in run_fields:
            section, name = "run", key
        else:
            raise ConfigError(
                f"{where} {key}: unknown key{did_you_mean(key, sorted(method_fields | run_fields))}; "
                f"expected a {config.method} setting "
                f"({', '.join(sorted(method_fields))}), a run setting ({', '.join(sorted(run_fields))}), "
                "or task.<section>.<key>"
            )
        valid = method_fields if section == "method_config" else run_fields
        if name not in valid:
            raise ConfigError(f"{where} {key}: unknown key {name!r}{did_you_mean(name, sorted(valid))}; "
                              f"expected one of {', '.join(sorted(valid))}")
        data[section][name] = value
    return validate_resolved(data, where)


def run_flags(flags: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Overrides from a command's own flags (``{"--steps": ("run.steps", 0)}``; None = not given),
    each value checked against its run setting alone first, so that an error names the flag the
    user typed (``--steps 0: ...``), not ``--set``."""
    out: dict[str, Any] = {}
    for flag, (key, value) in flags.items():
        if value is None:
            continue
        field = key.split(".", 1)[1]
        try:
            RunSettings.model_validate({field: value})
        except ValidationError as exc:
            errors = [e for e in exc.errors() if e["loc"][:1] == (field,)]
            if errors:
                msg = str(errors[0]["msg"]).removeprefix("Value error, ")
                raise ConfigError(f"{flag} {value}: {msg} (it sets {key})") from None
        out[key] = value
    return out


def validate_resolved(data: dict[str, Any], where: str) -> ResolvedConfig:
    try:
        resolved = ResolvedConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(where, exc, ResolvedConfig)) from None
    try:  # validate (and fill defaults of) the method's own config
        resolved.method_config = resolved.method_settings().model_dump(mode="json")
    except ValidationError as exc:
        raise ConfigError(format_validation_error(where, exc, get_method(resolved.method).Config,
                                                  prefix="method_config.")) from None
    return resolved


def resolve(method: str, task_file: str | Path | None = None, config_file: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> ResolvedConfig:
    """Build the resolved config of a run from a task file or an exported config file."""
    try:  # the key is checked from the registry's table; the method's module loads after the task
        method_family(method)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    if config_file is not None:
        path = Path(config_file)
        data = read_yaml_mapping(path, "config", "keys method, task, method_config, run")
        if data.get("method", method) != method:
            raise ConfigError(f"{path}: method: file is for {data['method']!r}, command asked for {method!r}")
        data["method"] = method
        data.setdefault("method_config", {})
        if task_file is not None:
            data["task"] = load_task(task_file, family=_family_of(method)).model_dump(mode="json")
        resolved = validate_resolved(data, str(path))
    else:
        if task_file is None:
            raise ConfigError("give --task FILE or --config FILE")
        task = load_task(task_file, family=_family_of(method))
        resolved = validate_resolved(
            {"method": method, "task": task.model_dump(mode="json"),
             "method_config": get_method(method).Config().model_dump(mode="json"),
             # the method's own budget unless the task's run or an override sets one
             "run": {**RunSettings().model_dump(), "steps": get_method(method).default_steps}},
            str(task_file),
        )
    resolved = apply_overrides(resolved, overrides or {}) if overrides else resolved
    from orchestrator.core.redact import has_redacted

    if has_redacted(resolved.task.model_dump(mode="json")):
        raise ConfigError(f"{config_file}: task: holds redacted secrets (storage_options are never recorded); "
                          "give the task file again with --task FILE, or put the credentials in the environment")
    try:
        check_family(method, resolved.task.source.family)
    except ValueError as exc:
        raise ConfigError(f"{task_file or config_file}: source.family: {exc}") from None
    return resolved


def _family_of(method: str) -> str:
    """The source family a method adapts (for the built-in synthetic tasks)."""
    fam = method_family(method)
    return next(f for f, m in SOURCE_FAMILIES.items() if m == fam)
