"""``Detector``: load or build a model, detect objects in images, evaluate, save.

    from detrkit import Detector

    det = Detector.from_checkpoint("runs/demo/checkpoint_best")
    for pred in det.predict(["a.jpg", "b.jpg"], threshold=0.5):
        print(pred.names, pred.scores, pred.boxes_xyxy)   # boxes in pixels of each image

Images may be file paths, PIL images, numpy ``HWC`` uint8 RGB arrays, or ``CHW`` tensors
(uint8 0..255 or float 0..1, not normalised). Resizing to the model's input size and
normalisation happen inside; boxes come back in the pixels of the image as given.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from detrkit.config import Config, ConfigError, apply_overrides, merge, merge_keywords
from detrkit.inference.fold import InferenceView
from detrkit.models import DetectionModel
from detrkit.pretrained import convert_checkpoint
from detrkit.structures import LabelMap, Prediction

if TYPE_CHECKING:  # pragma: no cover
    from detrkit.engine import FitResult

__all__ = ["Detector", "Prediction", "ImageInput", "Precision", "convert_checkpoint"]

ImageInput = str | Path | Image.Image | np.ndarray | Tensor
# the forward's precision in predict(): float32, or autocast to bfloat16 / float16 (CUDA)
Precision = Literal["fp32", "bf16", "fp16"]
_AMP = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}


def _resolve_device(device: str | torch.device) -> torch.device:
    from detrkit.engine.trainer import resolve_device

    return device if isinstance(device, torch.device) else resolve_device(device)


class Detector:
    """A detection model with its config and label map, ready to predict.

    model: the :class:`detrkit.models.DetectionModel` module (in eval mode on ``device``).
    config: the resolved :class:`~detrkit.config.Config`. label_map: class index -> dataset
    category id -> name (default: ``class_0 ..``). precision: of :meth:`predict`'s forward,
    ``fp32`` or autocast ``bf16`` (CPU, CUDA) / ``fp16`` (CUDA); the sampling and box
    arithmetic stay float32 either way (see ``docs/speed.md`` for the measured tolerance).
    """

    def __init__(
        self,
        model: nn.Module,
        config: Config,
        label_map: LabelMap | None = None,
        device: str | torch.device = "auto",
        precision: Precision = "fp32",
    ) -> None:
        self.device = _resolve_device(device)
        self._attach(model, config, label_map)
        self.precision = precision
        # whether the class count was chosen (False: train() takes the data's)
        self._classes_chosen = True

    def _attach(self, model: nn.Module, config: Config, label_map: LabelMap | None) -> None:
        from detrkit.data.transforms import build_transforms
        from detrkit.inference.postprocess import build_postprocessor

        self.model = model.to(self.device).eval()
        self._view = InferenceView()
        self.config = config
        self.label_map = label_map or LabelMap.default(config.model.num_classes)
        if len(self.label_map) > config.model.num_classes:
            raise ConfigError(
                f"model.num_classes: {config.model.num_classes} but the label map "
                f"names {len(self.label_map)} classes"
            )
        self.postprocessor = build_postprocessor(config)
        d = config.data
        self._transforms = build_transforms(d.augment, d.mean, d.std, train=False)

    @property
    def precision(self) -> Precision:
        return self._precision

    @precision.setter
    def precision(self, value: Precision) -> None:
        if value not in _AMP:
            raise ValueError(f"precision: '{value}' is not one of {list(_AMP)}")
        if value == "fp16" and self.device.type != "cuda":
            raise ValueError(f"precision: fp16 needs a CUDA device; use bf16 on {self.device.type}")
        if value != "fp32" and not isinstance(self.model, nn.Module):
            raise ValueError("precision: an exported model runs in the precision it was saved in")
        self._precision = value

    def inference_module(self) -> nn.Module:
        """What :meth:`predict` and :meth:`evaluate` run: :attr:`model` with the frozen batch
        norm folded into its backbone (and ``channels_last`` on the CPU, where oneDNN's
        convolutions are faster in it), see :class:`detrkit.inference.fold.InferenceView`. Outputs equal
        :attr:`model`'s up to float rounding; an exported model runs as it is."""
        if not isinstance(self.model, DetectionModel):
            return self.model
        return self._view.of(self.model, channels_last=self.device.type == "cpu")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_preset(
        cls,
        name: str,
        num_classes: int | None = None,
        *,
        device: str | torch.device = "auto",
        **overrides: Any,
    ) -> Detector:
        """A randomly initialised model of preset ``name`` (see ``detrkit presets``).

        num_classes: sets ``model.num_classes``. overrides: config sections as nested dicts
        (``model={"queries": {"num_queries": 50}}``) or dotted keys
        (``**{"model.queries.num_queries": 50}``).
        """
        from detrkit.models import build_model
        from detrkit.presets import get_preset

        cfg = get_preset(name)
        if num_classes is not None:
            cfg = merge(cfg, {"model": {"num_classes": num_classes}})
        cfg = merge_keywords(cfg, overrides).validate()
        detector = cls(build_model(cfg), cfg, LabelMap.default(cfg.model.num_classes), device)
        detector._classes_chosen = num_classes is not None
        return detector

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        *,
        overrides: Sequence[str] = (),
        precision: Precision = "fp32",
    ) -> Detector:
        """Load a detrkit checkpoint (``<stem>.safetensors`` + ``<stem>.json``; ``path`` may
        be the stem or either file). overrides: ``a.b=c`` strings applied to its config
        (for instance data settings used by :meth:`evaluate`)."""
        from detrkit.engine.checkpoint import load_model

        model, stored, label_map, _ = load_model(path, map_location="cpu")
        cfg = stored
        if overrides:
            cfg = apply_overrides(stored, list(overrides)).validate()
            if cfg.model != stored.model:
                raise ConfigError("overrides: model.* cannot change when loading a checkpoint")
        return cls(model, cfg, label_map, device, precision)

    @classmethod
    def from_official(
        cls,
        path_or_state: str | Path | dict,
        official_args: Any = None,
        *,
        device: str | torch.device = "auto",
    ) -> Detector:
        """Convert a checkpoint published by the original authors (DETR, Deformable DETR,
        DAB-DETR, DN-DETR, DINO; a ``.pth`` path or its loaded dict). official_args: the
        official argument namespace/dict when the file does not carry one."""
        from detrkit.convert import load_official

        converted = load_official(path_or_state, official_args=official_args)
        return cls(converted.model, converted.config, converted.label_map, device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        num_classes: int | None = None,
        *,
        device: str | torch.device = "auto",
        verbose: bool = True,
    ) -> Detector:
        """Start from published or earlier weights: a detrkit checkpoint, an official ``.pth``
        of any of the five code bases, or a Hugging Face model folder (``config.json`` +
        ``model.safetensors`` of DETR, Deformable DETR or DAB-DETR).

        num_classes: None keeps the weights' classes (and label map). Another count keeps
        every tensor of the architecture and re-initialises the class heads (every decoder
        layer, the encoder proposals; focal models with the prior-probability bias) and the
        denoising label embedding; :meth:`train` then fine-tunes. With ``verbose`` the
        transfer table (loaded / re-initialised / unused) is printed when something is not
        loaded. Without num_classes, :meth:`train` takes the class count of its data.
        """
        from detrkit.pretrained import read_pretrained, start_model

        weights = read_pretrained(path)
        model, cfg, label_map, report = start_model(weights, num_classes)
        if verbose and (report.reinitialised or report.unused):
            print(report.table())
        detector = cls(model, cfg, label_map, device)
        detector._classes_chosen = num_classes is not None
        return detector

    def train(
        self,
        data: str | Path | None = None,
        *,
        epochs: int | None = None,
        output_dir: str | Path = "runs/detrkit",
        num_classes: int | None = None,
        progress: bool = True,
        overrides: Sequence[str] = (),
    ) -> FitResult:
        """Fine-tune this detector (the same engine as ``detrkit train``), starting from its
        current weights.

        data: a dataset folder (COCO, VOC) or a YOLO ``data.yaml``, its format detected
        (``data.dataset``, ``data.format=auto``); None keeps ``config.data``. num_classes:
        None takes the class count of the training data unless the detector was made with
        one (its class heads are re-initialised when the count changes). overrides:
        ``a.b=c`` strings on the config (``train.lr=5e-5``, ``train.batch_size=4``, ...).

        Returns the :class:`~detrkit.engine.FitResult` (``history``: one row of losses and
        COCO metrics per epoch, ``best_ap``, checkpoint paths). Afterwards the detector holds
        the final weights, config and the data's label map.
        """
        from detrkit.engine import Trainer
        from detrkit.engine.transfer import PretrainedWeights

        sets = [f"train.output_dir={output_dir}"]
        if data is not None:
            sets += [f"data.dataset={data}", "data.format=auto"]
        if epochs is not None:
            sets.append(f"train.epochs={epochs}")
        if num_classes is not None:
            sets.append(f"model.num_classes={num_classes}")
        cfg = apply_overrides(self.config, sets + list(overrides))
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        start = PretrainedWeights(state, self.config, self.label_map, "this Detector", "detrkit")
        chosen = num_classes is not None or self._classes_chosen
        trainer = Trainer(cfg, progress=progress, init=start, classes_from_data=not chosen)
        result = trainer.fit()
        self._attach(trainer.model, trainer.cfg, trainer.label_map)
        self._classes_chosen = True
        return result

    @classmethod
    def from_onnx(cls, path: str | Path, runtime: str = "onnxruntime") -> Detector:
        """A file written by :meth:`export` (raw contract), run on the CPU by ``runtime``
        (``onnxruntime`` or ``openvino``): the same pre- and post-processing, so
        :meth:`predict` returns what the PyTorch detector would."""
        from detrkit.export import ExportedModel

        exported = ExportedModel(path, runtime)  # type: ignore[arg-type]
        return cls(exported, exported.config, exported.label_map, "cpu")  # type: ignore[arg-type]

    # ------------------------------------------------------------------ inference

    @staticmethod
    def read_image(image: ImageInput) -> Image.Image | Tensor:
        """``image`` in a form the transforms accept: a path is read as RGB PIL, a numpy
        ``HWC`` array becomes a PIL image, PIL images and ``CHW`` tensors pass through."""
        from detrkit.data.images import as_image

        return as_image(image)

    @torch.no_grad()
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        threshold: float = 0.5,
        *,
        batch_size: int = 8,
    ) -> list[Prediction]:
        """Detect objects in one image or a list of images; one :class:`Prediction` per image
        (always a list), keeping detections with ``score >= threshold``."""
        from detrkit.data.collate import images_to_batch
        from detrkit.data.images import image_size_hw
        from detrkit.engine.precision import autocast, to_float32

        items = [images] if not isinstance(images, (list, tuple)) else list(images)
        model = self.inference_module()
        predictions: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = [self.read_image(item) for item in items[start : start + batch_size]]
            sizes = [image_size_hw(im) for im in chunk]
            tensors = [self._preprocess(im) for im in chunk]
            batch = images_to_batch(tensors, orig_sizes=sizes).to(self.device)
            with autocast(self.device, _AMP[self._precision]):  # type: ignore[arg-type]
                outputs = to_float32(model(batch.images, batch.mask))
            detections = self.postprocessor(outputs, batch.orig_sizes)
            for det, size in zip(detections, sizes):
                det = det.filter(threshold)
                labels = det.labels.cpu()
                predictions.append(
                    Prediction(
                        boxes_xyxy=det.boxes_xyxy.float().cpu(),
                        scores=det.scores.float().cpu(),
                        labels=labels,
                        names=[self.label_map.name(i) for i in labels.tolist()],
                        category_ids=[self._category_id(i) for i in labels.tolist()],
                        image_size=size,
                    )
                )
        return predictions

    def _category_id(self, index: int) -> int:
        ids = self.label_map.category_ids
        return ids[index] if 0 <= index < len(ids) else index

    def _preprocess(self, image: Image.Image | Tensor) -> Tensor:
        """Val transforms (resize, to tensor, normalise): ``[3, h, w]`` float."""
        return self._transforms(image).image

    # ------------------------------------------------------------------ evaluation, saving

    def evaluate(
        self,
        images: str | Path | None = None,
        annotations: str | Path | None = None,
        *,
        batch_size: int | None = None,
        results_path: str | Path | None = None,
        progress: bool = True,
    ) -> dict[str, float]:
        """COCO metrics (``AP``, ``AP50``, ...) on a COCO-format set (``images`` folder +
        ``annotations`` JSON), or, when both are None, on the validation set of the config.
        results_path: also write the detections as a COCO results JSON. The annotations'
        categories are matched to the model's classes through :attr:`label_map`."""
        from detrkit.data.build import build_datasets, build_loader
        from detrkit.data.coco import CocoDetection
        from detrkit.engine.evaluation import CocoEvaluator
        from detrkit.engine.loop import evaluate

        if (images is None) != (annotations is None):
            raise ValueError("Detector.evaluate: give both images and annotations, or neither")
        if images is None or annotations is None:
            val = build_datasets(self.config.data)[1]  # any format; tiled if data.tiles says so
            images, annotations = val.images_dir, val.annotations_file
        dataset = CocoDetection(
            images, annotations, self._transforms, train=False, label_map=self.label_map
        )
        loader = build_loader(
            dataset,
            batch_size or self.config.train.batch_size,
            train=False,
            num_workers=self.config.data.num_workers,
            seed=0,
        )
        evaluator = CocoEvaluator(dataset.annotations_file, self.label_map)
        metrics = evaluate(
            self.inference_module(),
            self.postprocessor,
            loader,
            evaluator,
            self.device,
            amp="none",
            progress=progress,
        )
        if results_path is not None:
            evaluator.save_results(results_path)
        return metrics

    def save(self, path: str | Path) -> Path:
        """Write a detrkit checkpoint: ``<path>.safetensors`` + ``<path>.json``; returns the
        name (``path`` without suffix)."""
        from detrkit.engine.checkpoint import save_checkpoint

        return save_checkpoint(path, self.model, self.config, self.label_map).with_suffix("")

    def export(self, path: str | Path, **options: Any) -> Any:
        """Write the model as ONNX (see ``docs/export.md``) and check it against PyTorch.

        options: the fields of :class:`detrkit.export.ExportOptions` (``opset=17``,
        ``dynamic=True``, ``topk=None`` for the raw contract or ``K`` for the deploy one,
        ``msda``, ``with_mask``, ``check=True``, ``format="onnx"`` or ``"openvino"``).
        Returns the :class:`~detrkit.export.ExportResult`; raises
        :class:`~detrkit.export.ExportCheckError` (the file is kept) when the check fails.
        """
        from detrkit.export import ExportedModel, ExportOptions, export_model

        if isinstance(self.model, ExportedModel):
            raise ValueError(f"{self.model.path} is already an export; export the checkpoint")
        model = copy.deepcopy(self.model).cpu()  # the detector keeps its device
        return export_model(model, self.config, self.label_map, path, ExportOptions(**options))

    def __repr__(self) -> str:
        return (
            f"Detector({self.config.model.transformer.attention} attention, "
            f"{len(self.label_map)} classes, device={self.device})"
        )
