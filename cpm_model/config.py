"""The one experiment configuration: data, preprocessing, model, training, sweep and tracking.

Loaded from YAML presets (the packaged ones in cpm_model/presets/, chosen by name, or any YAML
file by path), overridden from the command line with
`--set section.key=value` (the value parsed as YAML), validated by name, and flattened to
`section.key` params for MLflow. Plain dataclasses and PyYAML only, so every layer can use it.
It holds the tracking URI as given (the process that connects needs it); what may be shown of it
is the tracking side's rule (`pipeline.redaction.public_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .geometry import STRIDE


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds a bad value."""


@dataclass
class DataConfig:
    # Data spec: lspet:PATH, lsp:PATH, mpii:PATH, synthetic[:N]; '+' joins datasets with one joint set.
    spec: str = "synthetic"
    # HDF5 caches live outside the repository by default (a job's --working-dir must not ship them).
    cache_dir: str = "~/.cache/cpm-pipeline"
    # Cap on training samples (None = all), for quick runs.
    max_train_samples: int | None = None
    max_val_samples: int | None = None


@dataclass
class PreprocessConfig:
    input_size: int = 368  # crop side in pixels, the network input; belief maps are input_size / STRIDE
    sigma: float = 1.0  # ideal belief-map Gaussian, in heatmap cells
    # How training crops are chosen: "bbox" (joints' bounding box, the default) or "image"
    # (the evaluation protocol: image centre and size). Evaluation crops never use ground truth.
    train_crop: str = "bbox"
    # Crop side = context x person size (bbox side for training, image-derived for evaluation).
    crop_context: float = 1.3
    workers: int = 0  # preprocessing processes; 0 = all cores


@dataclass
class ModelConfig:
    backbone: str = "paper"  # "paper" (Fig. 2, 9x9 convs) or "vgg" (VGG-19 conv1-conv4 front)
    stages: int = 6
    width: float = 1.0  # multiplier on the paper's channel counts (128 / 32 / 512)
    stage1_kernel: int = 9  # kernel of stage 1's large convolutions and of the shared trunk
    # Kernel and number of the large convolutions in stages >= 2 (the receptive-field knob);
    # None = the backbone's own layout (paper: three 11x11, vgg: five 7x7).
    later_kernel: int | None = None
    later_convs: int | None = None
    batch_norm: bool = False
    center_sigma: float = 21.0  # centre-map Gaussian, in input pixels


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16
    optimizer: str = "adam"  # "sgd" (the paper's recipe) or "adam" (MMPose's CPM recipe)
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    # "step" (x lr_gamma every lr_step_epochs), "cosine", or "constant"; warm-up in epochs first.
    lr_schedule: str = "step"
    lr_step_epochs: int = 10
    lr_gamma: float = 0.333
    warmup_epochs: float = 0.0
    # "sum" = Caffe's EuclideanLoss (sum over map pixels / 2N), which the paper's lr assumes;
    # "mean" = PyTorch's mean-reduced MSE.
    loss_reduction: str = "mean"
    intermediate_supervision: bool = True
    # "joint": all stages trained together; "stagewise": stage t trained with earlier stages frozen;
    # "stagewise_finetune": stagewise, then joint fine-tuning.
    training_scheme: str = "joint"
    finetune_epochs: int = 0  # joint epochs after a stagewise schedule
    augment: bool = True
    scale_min: float = 0.7
    scale_max: float = 1.3
    rotation_deg: float = 40.0
    flip: bool = True
    precision: str = "auto"  # "auto" (bf16 autocast where the device has bf16 instructions), "bf16" or "fp32"
    seed: int = 0
    init_weights: str | None = None  # a local state-dict file (e.g. ImageNet VGG weights)
    max_steps_per_epoch: int | None = None
    eval_flip: bool = False
    # Predict twice: re-crop each evaluation crop around the first pass's prediction, predict
    # again (cpm_model.recrop). Validation, the test split, evaluate and predict all follow it.
    eval_refine: bool = False
    # Fraction of training samples re-cropped around their annotated joints (the second pass's
    # crop) before augmentation, so that one model learns both crops.
    recrop_prob: float = 0.0
    # torch.compile the training step's model (compiled once per training phase, reused every
    # epoch); off by default: compilation costs tens of seconds and pays only on long GPU runs.
    compile: bool = False


@dataclass
class SweepConfig:
    # Grid over dotted config keys, e.g. {"model.stages": [1, 2, 3], "train.seed": [0, 1]}.
    grid: dict[str, list] = field(default_factory=dict)
    # Named combinations that are not a product (e.g. training schemes): each variant is a dict of
    # dotted overrides, crossed with the grid. Empty = just the grid.
    variants: list = field(default_factory=list)
    # Random search over dotted keys: {"train.lr": {"loguniform": [1e-4, 1e-2]}}.
    search: dict[str, dict] = field(default_factory=dict)
    num_samples: int = 1
    scheduler: str | None = None  # None or "asha"
    workers_per_trial: int = 1
    use_gpu: bool | None = None  # None = decided from the cluster
    max_concurrent_trials: int | None = None  # None = derived from the cluster
    max_failures: int = 2
    storage_path: str = "~/ray_results/cpm-pipeline"


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # None = MLFLOW_TRACKING_URI or the embedded SQLite default
    experiment: str = "cpm-pipeline"


SEARCH_DISTRIBUTIONS = ("loguniform", "uniform", "choice")


@dataclass(frozen=True)
class Distribution:
    """One `sweep.search` entry, parsed when the config loads: `loguniform` and `uniform` draw a
    float in [low, high]; `choice` picks one of `values`."""

    kind: str  # one of SEARCH_DISTRIBUTIONS
    low: float = 0.0
    high: float = 0.0
    values: tuple = ()

    def points(self) -> list:
        """The values to check against the key's own rules: the bounds, or every choice."""
        return list(self.values) if self.kind == "choice" else [self.low, self.high]


@dataclass
class ExperimentConfig:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # sweep.search parsed into distributions, once (the runner builds Tune's space from it). An
        # attribute, not a field: to_dict(), the MLflow params and the YAML keep the search as written.
        self.search_space: dict[str, Distribution] = validate(self)

    # --- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat_params(self) -> dict[str, Any]:
        """`section.key` -> value, for MLflow params (dicts and lists as JSON)."""
        flat: dict[str, Any] = {"name": self.name}
        data = self.to_dict()
        for section in SECTIONS:
            for key, value in data[section].items():
                flat[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else value
        return flat

    def with_overrides(self, overrides: dict[str, Any]) -> "ExperimentConfig":
        """A copy with dotted-key overrides applied (values already parsed)."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value)
        return from_dict(data)


SECTIONS = ("data", "preprocess", "model", "train", "sweep", "tracking")


_CHOICES = {
    "preprocess.train_crop": ("bbox", "image"),
    "model.backbone": ("paper", "vgg"),
    "train.optimizer": ("sgd", "adam"),
    "train.lr_schedule": ("step", "cosine", "constant"),
    "train.loss_reduction": ("sum", "mean"),
    "train.training_scheme": ("joint", "stagewise", "stagewise_finetune"),
    "train.precision": ("auto", "bf16", "fp32"),
    "sweep.scheduler": (None, "asha"),
}


def _section_class(section: str):
    return get_type_hints(ExperimentConfig)[section]


# Types are read from the hints themselves (typing.get_origin / get_args) rather than through
# pydantic: the config stays plain dataclasses and PyYAML (no dependency that only Ray and MLflow
# bring), the hints used are few (X, X | None, dict[...], list), and pydantic's own messages would
# have to be translated back into these one-line ones.
# Outer type -> (the Python types a value may have, what the message says is expected). A bool is
# an int in Python: it is refused by name where a number is expected.
_EXPECTED = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
    dict: ((dict,), "a mapping"),
    list: ((list,), "a list"),
}


def _outer_type(hint: Any) -> tuple[type, bool]:
    """(the outer type of a hint, whether it allows None): `int | None` -> (int, True),
    `dict[str, list]` -> (dict, False). A dict's keys and values are checked where they are used."""
    allows_none = False
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"config fields are X or X | None, not {hint}")
        hint, allows_none = args[0], True
    base = get_origin(hint) or hint
    if base not in _EXPECTED:
        raise TypeError(f"config fields take {sorted(t.__name__ for t in _EXPECTED)}, not {hint}")
    return base, allows_none


def _check_type(path: str, value: Any, hint: Any) -> Any:
    """Coerce ints to floats where a float is expected; reject other type mismatches by name."""
    base, allows_none = _outer_type(hint)
    if value is None:
        if allows_none:
            return None
        raise ConfigError(f"config key '{path}' must not be null")
    if base is float and isinstance(value, str) and _number(value) is not None:
        value = _number(value)  # YAML 1.1 reads "1e-3" as a string
    allowed, expected = _EXPECTED[base]
    if not isinstance(value, allowed) or (isinstance(value, bool) and base is not bool):
        raise ConfigError(f"config key '{path}' must be {expected}, got {value!r}")
    return float(value) if base is float else value


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build a config from nested plain data, rejecting unknown keys and bad types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    unknown = set(data) - set(SECTIONS) - {"name"}
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected 'name' or one of {list(SECTIONS)}")
    kwargs: dict[str, Any] = {}
    if "name" in data:
        kwargs["name"] = _check_type("name", data["name"], str)
    for section in SECTIONS:
        values = data.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {values!r}")
        cls = _section_class(section)
        hints = get_type_hints(cls)
        bad = set(values) - set(hints)
        if bad:
            raise ConfigError(f"unknown config key(s) {sorted(f'{section}.{k}' for k in bad)}; "
                              f"'{section}' takes {sorted(hints)}")
        checked = {k: _check_type(f"{section}.{k}", copy.deepcopy(v), hints[k]) for k, v in values.items()}
        kwargs[section] = cls(**checked)
    return ExperimentConfig(**kwargs)


def validate(config: ExperimentConfig) -> dict[str, Distribution]:
    """Reject bad values, naming the key and what was expected; return sweep.search parsed."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value not in choices:
            raise ConfigError(f"config key '{dotted}' must be one of {list(choices)}, got {value!r}")
    for key, ok, expected in _range_checks(config):
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"config key '{key}' must be {expected}, got {getattr(getattr(config, section), name)!r}")
    for dotted in list(config.sweep.grid) + list(config.sweep.search):
        _check_dotted_key(dotted, where="sweep grid/search")
    for i, variant in enumerate(config.sweep.variants):
        if not isinstance(variant, dict) or not variant:
            raise ConfigError(f"sweep.variants[{i}] must be a non-empty mapping of dotted keys, got {variant!r}")
        for dotted in variant:
            _check_dotted_key(dotted, where=f"sweep.variants[{i}]")
    check_path_component(config.name, "config key 'name'")
    storage_path = config.sweep.storage_path
    if _URI_SCHEME.match(storage_path):
        raise ConfigError(f"config key 'sweep.storage_path' is {storage_path!r}: cloud storage paths are not "
                          "supported; use a path every node sees, e.g. a shared file system mount")
    for dotted, values in config.sweep.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid['{dotted}'] must be a non-empty list, got {values!r}")
    return _check_search_space(config)


def _range_checks(config: ExperimentConfig) -> list[tuple[str, bool, str]]:
    """(key, whether its value is in range, what is expected) for every bounded number."""
    m, t, p, d, s = config.model, config.train, config.preprocess, config.data, config.sweep
    return [
        ("model.stages", m.stages >= 1, "an integer >= 1"),
        ("model.width", m.width > 0, "a positive number"),
        ("model.stage1_kernel", m.stage1_kernel >= 1 and m.stage1_kernel % 2 == 1, "an odd integer >= 1"),
        ("model.later_kernel", m.later_kernel is None or (m.later_kernel >= 1 and m.later_kernel % 2 == 1),
         "an odd integer >= 1 (or null for the backbone's default)"),
        ("model.later_convs", m.later_convs is None or m.later_convs >= 1, "an integer >= 1 (or null)"),
        ("model.center_sigma", m.center_sigma > 0, "a positive number of pixels"),
        ("preprocess.input_size", p.input_size >= 32 and p.input_size % STRIDE == 0,
         f"a multiple of {STRIDE}, at least 32"),
        ("preprocess.sigma", p.sigma > 0, "a positive number of heatmap cells"),
        ("preprocess.crop_context", p.crop_context >= 1.0, "a number >= 1"),
        ("preprocess.workers", p.workers >= 0, "an integer >= 0"),
        ("train.epochs", t.epochs >= 1, "an integer >= 1"),
        ("train.batch_size", t.batch_size >= 1, "an integer >= 1"),
        ("train.lr", t.lr > 0, "a positive number"),
        ("train.scale_min", 0 < t.scale_min <= t.scale_max, "0 < scale_min <= scale_max"),
        ("train.rotation_deg", 0 <= t.rotation_deg <= 180, "degrees in [0, 180]"),
        ("train.recrop_prob", 0 <= t.recrop_prob <= 1, "a probability in [0, 1]"),
        ("train.lr_step_epochs", t.lr_step_epochs >= 1, "an integer >= 1"),
        ("train.finetune_epochs", t.finetune_epochs >= 0, "an integer >= 0"),
        ("train.max_steps_per_epoch", t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1,
         "an integer >= 1 (or null for the whole split)"),
        ("data.max_train_samples", d.max_train_samples is None or d.max_train_samples >= 1,
         "an integer >= 1 (or null for all samples)"),
        ("data.max_val_samples", d.max_val_samples is None or d.max_val_samples >= 1,
         "an integer >= 1 (or null for all samples)"),
        ("sweep.workers_per_trial", s.workers_per_trial >= 1, "an integer >= 1"),
        ("sweep.num_samples", s.num_samples >= 1, "an integer >= 1"),
        # Ray reads -1 as "retry for ever".
        ("sweep.max_failures", s.max_failures >= 0, "an integer >= 0 (restarts of a trial's worker group)"),
        ("sweep.max_concurrent_trials", s.max_concurrent_trials is None or s.max_concurrent_trials >= 1,
         "an integer >= 1 (or null: derived from the cluster)"),
    ]


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PATH_COMPONENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def check_path_component(value: str, what: str) -> None:
    """Names that become a directory (sweep ids, preset names): one safe path component."""
    if not isinstance(value, str) or not _PATH_COMPONENT.match(value):
        raise ConfigError(f"{what} is {value!r}: use letters, digits and '-', '_' or '.' "
                          "(not first), e.g. 'stages-run2'")


def _number(value: Any) -> float | None:
    """A bound of a search distribution as a float (YAML 1.1 reads '1e-3' as a string), else None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_distribution(where: str, spec: Any) -> Distribution:
    """{loguniform: [lo, hi]} | {uniform: [lo, hi]} | {choice: [v1, ...]} -> a Distribution; the
    one reading of that syntax (`where` names the entry in the error)."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_DISTRIBUTIONS:
        raise ConfigError(f"{where} must be {{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}} or "
                          f"{{choice: [v1, v2, ...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice must be a non-empty list of values, got {args!r}")
        return Distribution(kind, values=tuple(args))
    bounds = [_number(a) for a in args] if isinstance(args, list) and len(args) == 2 else [None]
    if None in bounds:
        raise ConfigError(f"{where}: {kind} must be [lo, hi], two numbers, got {args!r}")
    lo, hi = bounds
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs lo < hi, got [{lo:g}, {hi:g}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs bounds > 0, got [{lo:g}, {hi:g}]")
    return Distribution(kind, low=lo, high=hi)


def _check_search_space(config: ExperimentConfig) -> dict[str, Distribution]:
    """Every grid value, variant and search distribution is checked here, when the config loads,
    by applying it to this config: a bad one is named before any cache, run or trial exists."""
    for dotted, values in config.sweep.grid.items():
        for i, value in enumerate(values):
            _check_point(config, {dotted: value}, f"sweep.grid['{dotted}'][{i}]")
    for i, variant in enumerate(config.sweep.variants):
        _check_point(config, variant, f"sweep.variants[{i}]")
    space = {}
    for dotted, spec in config.sweep.search.items():
        where = f"sweep.search['{dotted}']"
        space[dotted] = distribution = parse_distribution(where, spec)
        if distribution.kind != "choice":
            where += f" ({distribution.kind} draws floats; use choice for integers or booleans)"
        for value in distribution.points():
            _check_point(config, {dotted: value}, where)
    return space


def _check_point(config: ExperimentConfig, overrides: dict[str, Any], where: str) -> None:
    data = config.to_dict()
    data["sweep"].update(grid={}, variants=[], search={})  # one point, not the whole space again
    try:
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value)
        from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_dotted_key(dotted: str, where: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS or parts[1] not in get_type_hints(_section_class(parts[0])):
        raise ConfigError(f"{where} names unknown config key '{dotted}'; expected 'section.key', e.g. 'model.stages'")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    if dotted == "name":
        data["name"] = value
        return
    _check_dotted_key(dotted, where="override")
    section, key = dotted.split(".")
    data.setdefault(section, {})[key] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'model.stages=3' -> ('model.stages', 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. model.stages=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip(), value


PRESETS_DIR = Path(__file__).resolve().parent / "presets"
# What every command runs without --config (the embedded sweep: small, synthetic data, minutes on a CPU).
DEFAULT_PRESET = "default"


def preset_names() -> list[str]:
    """The packaged presets, by name (cpm_model/presets/NAME.yaml)."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """The YAML file of a preset name ('synthetic_tiny') or of a path ('./my.yaml'): an existing
    file wins, then a packaged preset of that name; anything else is a ConfigError that lists them."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = str(name_or_path)
    packaged = PRESETS_DIR / f"{text.removesuffix('.yaml')}.yaml"
    if "/" not in text and "\\" not in text and packaged.is_file():
        return packaged
    what = "is a directory, not a YAML file" if path.is_dir() else "is neither a file nor a packaged preset"
    raise ConfigError(f"config {text!r} {what}; packaged presets: {', '.join(preset_names())}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                data: str | None = None, tracking_uri: str | None = None,
                storage_path: str | None = None) -> ExperimentConfig:
    """A preset (a packaged name or a YAML file, `preset_path`; None = the dataclass defaults)
    with `section.key=value` overrides applied, then the command line's --data, --tracking-uri
    and --storage-path as plain strings (they win)."""
    settings: dict[str, Any] = {}
    if path is not None:
        path = preset_path(path)
        try:
            settings = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(settings, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(settings).__name__}")
    try:
        for text in overrides or []:
            key, value = parse_override(text)
            _set_dotted(settings, key, value)
        # Taken verbatim, not as YAML: a path may hold '#', ': ' or spaces that YAML would cut.
        verbatim = {"data.spec": data, "tracking.tracking_uri": tracking_uri, "sweep.storage_path": storage_path}
        for dotted, value in verbatim.items():
            if value is not None:
                _set_dotted(settings, dotted, value)
        return from_dict(settings)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def add_config_arguments(parser) -> None:
    """Add --config, --set and --print-config to an argparse parser."""
    parser.add_argument("--config", default=None, metavar="PRESET",
                        help=f"a packaged preset by name ({', '.join(preset_names())}) or a YAML file; "
                        f"default: {DEFAULT_PRESET}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.stages=3 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
