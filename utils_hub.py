"""The Hugging Face Hub: checks before training (a bad repo id, a push that would fail), then the export next to
the saved model (evaluation's image processor, the pictures of pictures.py, the model card that
``ModelCard.from_template`` renders from ``model_card_template.md``) and its push. Imports no project module but
pictures.py: the run passes plain facts, its arguments and its results."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub import errors as hf_errors

from pictures import DEFAULT_NUM_PICTURES, PictureRow, draw_ics, draw_predictions  # noqa: F401 (the flag's default)

logger = logging.getLogger(__name__)

TRACKER_DIR = "runs"  # Accelerate's project folder: trackers write under it
CHECKPOINT_DIR = "checkpoints"  # train_icsd.py's checkpoints
CARD_FILE, RESULTS_FILE, PROCESSOR_FILE = "README.md", "all_results.json", "preprocessor_config.json"
PREDICTIONS_FILE, ICS_FILE = "predictions.png", "ics.png"
CARD_TEMPLATE = Path(__file__).with_name("model_card_template.md")
# What a push uploads (the model may be sharded), and what it never does even if a pattern matched.
UPLOAD_PATTERNS = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "config.json",
                   PROCESSOR_FILE, CARD_FILE, RESULTS_FILE, PREDICTIONS_FILE, ICS_FILE]
IGNORE_PATTERNS = [f"{CHECKPOINT_DIR}/*", f"{TRACKER_DIR}/*", "*.tmp*", ".*"]
METRICS = {"mean_iou": ("Mean IoU", "mIoU"), "mean_accuracy": ("Mean Accuracy", "mean accuracy"),
           "overall_accuracy": ("Overall Accuracy", "pixel accuracy")}  # model-index name, the card's label
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
_ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")

# huggingface_hub's shared HTTP client has no timeout: the push check makes one request with this one instead.
HUB_PROBE_TIMEOUT_S = 5.0
OFFLINE, NETWORK, NO_TOKEN, BAD_TOKEN = "offline", "network", "no_token", "bad_token"  # HubProbeError.kind


class HubProbeError(Exception):
    """The Hub cannot take a push; ``kind`` says why, ``str(err)`` is a short reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` can never name a Hub repo (``validate_repo_id``), or None when it can. A pasted Hub token
    is described, never quoted back: ``validate_repo_id`` would quote it, and it accepts ``hf_...`` as a name."""
    if _TOKEN.search(repo_id):
        return ("holds what looks like a Hub access token (not shown): pass a repo id such as 'user/name'; the "
                "token belongs in `hf auth login` or HF_TOKEN")
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except hf_errors.HFValidationError as err:
        return f"is not a valid repo id ({' '.join(str(err).split())})"
    return None


def probe_hub_login() -> str:
    """The user name, once ``huggingface_hub.whoami`` (one request, no retries) shows a token that may write;
    else HubProbeError ``OFFLINE`` (no request made), ``NO_TOKEN``, ``BAD_TOKEN`` (refused, read-only) or
    ``NETWORK``, whose message never holds the token."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubProbeError(OFFLINE, "HF_HUB_OFFLINE=1 is set")
    endpoint, session = huggingface_hub.constants.ENDPOINT, huggingface_hub.utils.get_session()
    # whoami takes no timeout and the shared client has none: bound this one call, then restore the default.
    default_timeout, session.timeout = session.timeout, HUB_PROBE_TIMEOUT_S
    try:
        facts = huggingface_hub.whoami()
    except hf_errors.LocalTokenNotFoundError:
        raise HubProbeError(NO_TOKEN, "no Hub token on this machine: run `hf auth login` or set HF_TOKEN") from None
    except hf_errors.HfHubHTTPError as err:
        if (status := getattr(err.response, "status_code", None)) == 401:
            raise HubProbeError(BAD_TOKEN, "the Hub refuses the token (HTTP 401): run `hf auth login --force` or "
                                           "set HF_TOKEN") from None
        raise HubProbeError(NETWORK, f"{endpoint} answered HTTP {status}") from None
    except Exception as err:  # connection failures surface from several HTTP stacks
        raise HubProbeError(NETWORK, f"cannot reach {endpoint} ({type(err).__name__})") from None
    finally:
        session.timeout = default_timeout
    if facts.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise HubProbeError(BAD_TOKEN, "the token may only read: create one with write access")
    return str(facts.get("name", ""))


def source_kind(name: str | None) -> str:
    """Where a model or dataset came from: ``"config"`` (a random-init preset), ``"local"`` (a folder on this
    machine), ``"hub"`` (a Hub id) or ``"none"``."""
    if not name:
        return "none"
    if name.startswith("config:"):
        return "config"
    if Path(name).expanduser().exists() or _ABSOLUTE.match(name) or name.startswith(".") or name.count("/") > 1:
        return "local"
    return "hub"


@dataclass(frozen=True)
class ModelFacts:
    """A model as the card describes it: ``name`` as given (Hub id, folder or ``config:`` preset; the card
    never shows a folder's path), its class (``architecture``) and parameter count."""

    name: str
    architecture: str
    num_parameters: int

    @property
    def kind(self) -> str:
        return source_kind(self.name)


def describe_model(name: str, model: torch.nn.Module) -> ModelFacts:
    """:class:`ModelFacts` of ``model``, loaded from ``name``."""
    return ModelFacts(name, type(model).__name__, sum(p.numel() for p in model.parameters()))


@dataclass(frozen=True)
class DatasetFacts:
    """The evaluation data as the card describes it: a readable ``name`` (``pretty_name``, else ``type``), the
    model-index ``type`` (the Hub id, else the folder's name, never its path), ``hub_id`` (None for local data),
    ``subset`` (``--max_eval_samples`` kept the first ``num_eval_images``), ``card`` (the dataset card's front
    matter, {} when there is none or it cannot be read)."""

    name: str
    type: str
    hub_id: str | None
    split: str
    num_eval_images: int
    subset: bool = False
    card: dict = field(default_factory=dict)


def describe_dataset(info: Any, split: str, num_eval_images: int, subset: bool) -> DatasetFacts:
    """:class:`DatasetFacts` of the evaluated data; ``info`` is the run's ``data.DataInfo`` (``source``,
    ``preset`` and ``notes`` are read). The dataset card is a local folder's README.md or the Hub repo's."""
    if getattr(info, "preset", None) == "synthetic":
        return DatasetFacts("synthetic road scenes", "synthetic", None, split, num_eval_images, subset)
    if any(note.startswith("no validation split: carved") for note in getattr(info, "notes", [])):
        split = f"{split} (held-out part)"
    kind, card = source_kind(info.source), {}
    try:
        if kind == "local" and (readme := Path(info.source).expanduser() / CARD_FILE).is_file():
            card = huggingface_hub.metadata_load(readme) or {}
        elif kind == "hub":
            card = huggingface_hub.DatasetCard.load(info.source).data.to_dict()
    except Exception as err:  # the card only adds a licence and a name: never fail the export for it
        logger.warning("could not read the dataset card of %s (%s: %s)", info.source, type(err).__name__, err)
    hub_id = info.source if kind == "hub" else None
    type_ = hub_id or Path(str(info.source)).expanduser().resolve().name
    return DatasetFacts(str(card.get("pretty_name") or type_), type_, hub_id, split, num_eval_images, subset, card)


@dataclass(frozen=True)
class InferenceTiming:
    """Measured inference cost for the card: mean forward time per image (ms) of the student and, on the same
    images and ``device`` (e.g. "NVIDIA H100 80GB HBM3", "CPU"), of the teacher; ``image_size`` is the timed
    images' (height, width), None when they varied."""

    device: str
    student_ms: float
    teacher_ms: float | None = None
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.student_ms > 0 or (self.teacher_ms is not None and not self.teacher_ms > 0):
            raise ValueError(f"inference times must be > 0 ms; got {self.student_ms} and {self.teacher_ms}")


def redact(value: str) -> str:
    """``value`` as published (card, tracker hyperparameters): Hub tokens masked, an absolute path reduced to a
    ``path/to/<name>`` placeholder."""
    value = _TOKEN.sub("hf_***", value)  # no flag takes a token, but one may be pasted into a path or id
    if _ABSOLUTE.match(value):
        value = "path/to/" + (re.split(r"[\\/]", value.rstrip("\\/"))[-1].lstrip("~") or "folder")
    return value


def reproduce_command(argv: Sequence[str]) -> str:
    """The training command for the card, ``accelerate launch train_icsd.py ...``, :func:`redact`-ed."""
    out = ["accelerate launch", Path(argv[0]).name if argv else "train_icsd.py"]
    for arg in argv[1:]:
        prefix, value = arg.split("=", 1) if arg.startswith("--") and "=" in arg else ("", arg)
        out.append(shlex.quote(f"{prefix}={redact(value)}" if prefix else redact(value)))
    return " ".join(out)


def model_card(args: argparse.Namespace, info: Any, results: dict, *, student: ModelFacts,
               teacher: ModelFacts | None, dataset: DatasetFacts, pictures: Sequence[str] = (),
               argv: Sequence[str] = (), example_size: tuple[int, int] = (512, 512),
               timing: InferenceTiming | None = None) -> huggingface_hub.ModelCard:
    """The model card (README.md): ``model_card_template.md`` under the front matter the Hub reads (library, task,
    tags, data, base model, licence, model-index). ``info`` is the run's ``data.DataInfo``, ``results`` what
    all_results.json holds, ``pictures`` those beside the card, ``argv`` the command line (published redacted),
    ``example_size`` the (width, height) of the usage snippet's image, ``timing`` the speed sentence's facts."""
    if getattr(args, "hub_model_id", None):  # the title: the repo's name, else a description (never a folder's)
        title = args.hub_model_id.split("/")[-1]
    else:
        how = "trained alone" if args.distill == "none" else f"distilled with {args.distill.upper()}"
        title = f"{student.architecture.replace('ForSemanticSegmentation', '')} student for {dataset.name}, {how}"
    tags = ["semantic-segmentation", "aicsd"]
    if args.distill != "none":
        tags = ["knowledge-distillation", *tags] + ([args.distill] if args.distill != "aicsd" else [])
    found = dataset.card.get("license")  # the model is derived from the data: its one licence applies
    found = found[0] if isinstance(found, list) and len(found) == 1 else found
    evals = [huggingface_hub.EvalResult(
        task_type="image-segmentation", task_name="Semantic Segmentation", dataset_type=dataset.type,
        dataset_name=dataset.name, dataset_split=dataset.split, metric_type=key, metric_name=name,
        metric_value=round(float(results[f"eval_{key}"]), 6)) for key, (name, _) in METRICS.items()
        if results.get(f"eval_{key}") is not None]
    card_data = huggingface_hub.ModelCardData(
        library_name="transformers", pipeline_tag="image-segmentation", tags=tags,
        license=getattr(args, "hub_license", None) or (found if isinstance(found, str) and found else None),
        datasets=[dataset.hub_id] if dataset.hub_id else None, model_name=title, eval_results=evals or None,
        base_model=student.name if student.kind == "hub" else None)
    return huggingface_hub.ModelCard.from_template(
        card_data, template_path=str(CARD_TEMPLATE), args=args, info=info, results=results, title=title,
        hub_id=getattr(args, "hub_model_id", None), student=student, teacher=teacher, dataset=dataset,
        pictures=list(pictures), timing=timing, example_size=example_size, command=reproduce_command(argv),
        metrics=[(key, label) for key, (_, label) in METRICS.items()])


def evaluation_processor(processor: Any, short_side: int | None) -> Any:
    """A copy of ``processor`` that prepares an image as evaluation does: whole (no resize, no crop), or its short
    side resized to ``short_side`` (bilinear); mean, std and channel order stay. A checkpoint's own processor
    usually resizes to a fixed square (SegFormer: 512x512), which scores differently."""
    config = processor.to_dict()
    config["do_resize"] = short_side is not None
    if short_side is not None:
        config.update(size={"shortest_edge": int(short_side)}, resample=2)  # 2: PIL bilinear, as evaluation's
    config.update({flag: False for flag in ("do_center_crop", "do_pad") if flag in config})
    config.pop("image_processor_type", None)
    return type(processor).from_dict(config)


def make_readable(folder: str | Path) -> None:
    """Give every file directly in ``folder`` the mode ``save_pretrained`` gives its JSON files (0644 under the
    usual umask 022): safetensors 0.8 writes the weights with mode 0600 whatever the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def export_folder(output_dir: str | Path, *, args: argparse.Namespace, info: Any, results: dict, processor: Any,
                  student: ModelFacts, teacher: ModelFacts | None, dataset: DatasetFacts,
                  rows: Sequence[PictureRow] = (), argv: Sequence[str] = (),
                  timing: InferenceTiming | None = None) -> None:
    """Write the processor, the pictures and the card next to the saved model and make every file readable; warn
    (a run's one warning about it) when the card states no licence."""
    out = Path(output_dir)
    evaluation_processor(processor, getattr(args, "eval_short_side", None)).save_pretrained(out)
    pictures = [PREDICTIONS_FILE] if rows else []
    if rows:
        draw_predictions(rows, info.id2label).save(out / PREDICTIONS_FILE)
    if any(row.student_ics is not None for row in rows):
        draw_ics(rows, info.id2label, args.temperature).save(out / ICS_FILE)
        pictures.append(ICS_FILE)
    height, width = rows[0].label.shape if rows else (512, 512)
    card = model_card(args, info, results, student=student, teacher=teacher, dataset=dataset, argv=argv,
                      pictures=pictures, example_size=(width, height), timing=timing)
    card.save(out / CARD_FILE)
    if card.data.license is None:
        logger.warning("the model card states no licence: pass --hub_license (the training data's terms apply)")
    make_readable(out)


def push_to_hub(output_dir: str | Path, repo_id: str, *, private: bool = False,
                commit_message: str = "AICSD student") -> str:
    """Create (or reuse) the model repo, upload the export (:data:`UPLOAD_PATTERNS`) and nothing else (no tracker
    logs or checkpoints), and return the repo id the Hub assigned. A bare name gets the user's namespace, which
    the card's snippet then shows. The token (``hf auth login`` or ``HF_TOKEN``) is never printed."""
    api = huggingface_hub.HfApi()
    repo = api.create_repo(repo_id, exist_ok=True, private=private)
    card = Path(output_dir) / CARD_FILE
    if repo.repo_id != repo_id and card.is_file():
        card.write_text(card.read_text().replace(f'"{repo_id}"', f'"{repo.repo_id}"'))
    api.upload_folder(repo_id=repo.repo_id, folder_path=str(output_dir), commit_message=commit_message,
                      allow_patterns=UPLOAD_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    logger.info("pushed %s to https://huggingface.co/%s", output_dir, repo.repo_id)
    return repo.repo_id
