"""The one experiment configuration: data, preprocessing, model, training, sweep and tracking.

Loaded from YAML presets (the packaged ones in cpm_model/presets/, chosen by name, or any YAML
file by path), overridden from the command line with
`--set section.key=value` (the value parsed as YAML), validated by name, and flattened to
`section.key` params for MLflow. Plain dataclasses and PyYAML only, so every layer can use it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

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
    precision: str = "auto"  # "auto" (bf16 autocast where it is faster), "bf16" or "fp32"
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
        validate(self)

    # --- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """to_dict() with the tracking URI's password or token masked (`redact_uri`): the form that
        is printed, logged to MLflow and stored in checkpoints. Only the sweep's driver connects."""
        data = self.to_dict()
        data["tracking"]["tracking_uri"] = redact_uri(data["tracking"]["tracking_uri"])
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.public_dict(), sort_keys=False)

    def flat_params(self) -> dict[str, Any]:
        """`section.key` -> value, for MLflow params (dicts and lists as JSON)."""
        flat: dict[str, Any] = {"name": self.name}
        public = self.public_dict()
        for section in SECTIONS:
            for key, value in public[section].items():
                flat[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else value
        return flat

    def with_overrides(self, overrides: dict[str, Any]) -> "ExperimentConfig":
        """A copy with dotted-key overrides applied (values already parsed)."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value)
        return from_dict(data)


SECTIONS = ("data", "preprocess", "model", "train", "sweep", "tracking")

REDACTED = "***"
# Query parameters that carry credentials (password=, sslpassword=, token=, access_token=, api_key=).
_SECRET_QUERY_KEY = re.compile(r"pass|pwd|token|secret|key", re.IGNORECASE)
_QUERY_PARAM = re.compile(r"([?&;])([^=&;#]*)=([^&;#]+)")


def _secret_spans(uri: str | None) -> list[tuple[int, int]]:
    """(start, end) of each secret in a URI: the password of `user:password@host` and the values
    of credential query parameters (`?password=`, `?token=`)."""
    if not uri or "://" not in uri:
        return []
    begin = uri.index("://") + 3
    query = min((i for i in (uri.find("?", begin), uri.find("#", begin)) if i >= 0), default=len(uri))
    spans = []
    at = uri.rfind("@", begin, query)  # the last '@': an unescaped '/' in a password is still caught
    colon = uri.find(":", begin, at) if at >= 0 else -1
    if colon >= 0 and at > colon + 1:
        spans.append((colon + 1, at))
    spans += [m.span(3) for m in _QUERY_PARAM.finditer(uri, query) if _SECRET_QUERY_KEY.search(m[2])]
    return spans


def uri_secrets(uri: str | None) -> list[str]:
    """The secrets of a URI as written (to scrub them from error text as well)."""
    return [uri[a:b] for a, b in _secret_spans(uri)]


def redact_uri(uri: str | None) -> str | None:
    """The URI with every secret replaced by ***; a URI without one is returned unchanged."""
    for a, b in reversed(_secret_spans(uri)):
        uri = uri[:a] + REDACTED + uri[b:]
    return uri
_SECTION_TYPES = {f.name: f.type for f in fields(ExperimentConfig) if f.name in SECTIONS}

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


def _check_type(path: str, value: Any, hint: Any) -> Any:
    """Coerce ints to floats where a float is expected; reject other type mismatches by name."""
    text = str(hint)
    allows_none = "None" in text
    if value is None:
        if allows_none:
            return None
        raise ConfigError(f"config key '{path}' must not be null")
    base = text.replace(" | None", "").replace("typing.Optional[", "").rstrip("]")
    if hint is bool or base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be true or false, got {value!r}")
    elif hint is int or base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}' must be an integer, got {value!r}")
    elif hint is float or base == "float":
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' must be a number, got {value!r}")
        value = float(value)
    elif hint is str or base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' must be a string, got {value!r}")
    elif base.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}")
    elif base.startswith("list"):
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}' must be a list, got {value!r}")
    return value


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


def validate(config: ExperimentConfig) -> None:
    """Reject bad values, naming the key and what was expected."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value not in choices:
            raise ConfigError(f"config key '{dotted}' must be one of {list(choices)}, got {value!r}")
    m, t, p, d, s = config.model, config.train, config.preprocess, config.data, config.sweep
    checks = [
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
    for key, ok, expected in checks:
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
    if _URI_SCHEME.match(s.storage_path):
        raise ConfigError(f"config key 'sweep.storage_path' is {s.storage_path!r}: cloud storage paths are not "
                          "supported; use a path every node sees, e.g. a shared file system mount")
    for dotted, values in config.sweep.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid['{dotted}'] must be a non-empty list, got {values!r}")
    _check_search_space(config)


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PATH_COMPONENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
SEARCH_DISTRIBUTIONS = ("loguniform", "uniform", "choice")


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


def _check_search_space(config: ExperimentConfig) -> None:
    """Every grid value, variant and search distribution is checked here, when the config loads,
    by applying it to this config: a bad one is named before any cache, run or trial exists."""
    for dotted, values in config.sweep.grid.items():
        for i, value in enumerate(values):
            _check_point(config, {dotted: value}, f"sweep.grid['{dotted}'][{i}]")
    for i, variant in enumerate(config.sweep.variants):
        _check_point(config, variant, f"sweep.variants[{i}]")
    for dotted, spec in config.sweep.search.items():
        where = f"sweep.search['{dotted}']"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_DISTRIBUTIONS:
            raise ConfigError(f"{where} must be {{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}} or "
                              f"{{choice: [v1, v2, ...]}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}: choice must be a non-empty list of values, got {args!r}")
            points = args
        else:
            bounds = [_number(a) for a in args] if isinstance(args, list) and len(args) == 2 else [None]
            if None in bounds:
                raise ConfigError(f"{where}: {kind} must be [lo, hi], two numbers, got {args!r}")
            lo, hi = bounds
            if not lo < hi:
                raise ConfigError(f"{where}: {kind} needs lo < hi, got [{lo:g}, {hi:g}]")
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"{where}: loguniform needs bounds > 0, got [{lo:g}, {hi:g}]")
            points = bounds
            where += f" ({kind} draws floats; use choice for integers or booleans)"
        for value in points:
            _check_point(config, {dotted: value}, where)


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
