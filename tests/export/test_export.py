"""Exporting detectors to ONNX and running the files: the raw contract reproduces the PyTorch
model at sizes and batch sizes other than the traced one, from one file; predictions through
onnxruntime equal PyTorch's; bad input is one clear error."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from detrkit import Detector
from detrkit.export import ExportedModel, ExportError, read_export
from detrkit.export.check import labels_agree
from detrkit.export.graph import example_inputs
from detrkit.presets import get_preset
from tests.conftest import FULL_PRESETS, TINY_PRESETS
from tests.export.exports import ExportPool, Job, seeded_detector

TINY = TINY_PRESETS
FULL = FULL_PRESETS
OPENVINO = importlib.util.find_spec("openvino") is not None
EVERY_PRESET = "test_every_preset_exports_and_passes_the_check"
DEPLOY = "deploy at opset 13"


def _compare(det: Detector, path) -> None:
    """Compare an exported raw-contract file with PyTorch, independently of the export's own
    check, on two fresh inputs of other sizes and batch sizes than the traced one."""
    exported = ExportedModel(path)
    model = det.config.model
    queries = model.queries.num_queries * max(model.queries.num_patterns, 1)
    classes = model.num_classes + (model.class_activation == "softmax")  # + no-object
    for batch, h, w in [(1, 288, 224), (2, 224, 320)]:
        images, mask = example_inputs(batch, h, w, seed=7)
        with torch.no_grad():
            ref = det.model(images, mask)
        logits, boxes = (
            torch.from_numpy(a) for a in exported.run({"images": images, "mask": mask})
        )
        assert logits.shape == (batch, queries, classes)  # no denoising queries
        torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(boxes, ref.boxes, atol=1e-4, rtol=0)


def _tracing_cost(preset: str) -> tuple[bool, bool, int]:
    """Which exports take longest to trace, to start them first (the two workers then finish
    together instead of one waiting on a late long export): query selection, then deformable
    attention, then the number of feature levels."""
    model = get_preset(preset).model
    deformable = model.transformer.attention == "deformable"
    selects = model.queries.kind in ("two_stage", "mixed")
    return selects, deformable, model.transformer.num_feature_levels


@pytest.fixture(scope="module")
def exports(request, tmp_path_factory):
    """The exports the selected tests need, made two at a time in worker processes: every
    preset the parametrised test was asked for (OpenVINO IR too where installed), the
    default-options deformable export, and a deploy-contract export at opset 13."""
    folder = tmp_path_factory.mktemp("exports")
    fmt = (("format", "openvino"),) if OPENVINO else ()
    wanted = {"test_deformable_detr_tiny"} | {
        item.callspec.params["preset"]
        for item in request.session.items
        if getattr(item, "originalname", "") == EVERY_PRESET
    }
    jobs = {p: Job(p, folder / f"{p}.onnx", fmt if p != "test_deformable_detr_tiny" else ())
            for p in sorted(wanted, key=_tracing_cost, reverse=True)}  # fmt: skip
    topk = get_preset("test_deformable_detr_tiny").postprocess.num_select
    deploy = Job("test_deformable_detr_tiny", folder / "deploy.onnx",
                 (("opset", 13), ("topk", topk)))  # fmt: skip
    pool = ExportPool({DEPLOY: deploy, **jobs})  # the gathers and top-k: among the longest
    yield pool
    pool.close()


def _checked(exports: ExportPool, key: str):
    """Wait for an export; assert that its own check ran and passed; the job and a detector
    with the same weights."""
    job, checked = exports.result(key)
    assert checked.error is None, checked.error
    assert checked.checks and all(passed for _, passed, _ in checked.checks), checked.checks
    return job, checked, seeded_detector(job.preset)


@pytest.fixture(scope="module")
def deformable_export(exports):
    job, _, det = _checked(exports, "test_deformable_detr_tiny")
    _compare(det, job.path)
    return det, job.path


def test_one_file_serves_other_sizes_and_batches(deformable_export):
    _, path = deformable_export
    meta, cfg, label_map = read_export(path)
    assert meta["contract"] == "raw" and meta["preset"] == "" and meta["msda"] == "grid_sample"
    assert cfg.model.num_classes == len(label_map)
    import onnx

    proto = onnx.load(str(path))
    assert next(o.version for o in proto.opset_import if o.domain == "") == 17
    ops = {n.op_type for n in proto.graph.node}
    assert "GridSample" in ops and not any(op.startswith("Random") for op in ops)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_from_onnx_predicts_like_pytorch(deformable_export, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    det, path = deformable_export
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(90, 130), (140, 70)]]
    mine = Detector.from_onnx(path, runtime).predict(images, threshold=0.0)
    theirs = det.predict(images, threshold=0.0)
    for a, b in zip(mine, theirs):
        assert a.image_size == b.image_size and a.names == b.names
        torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.boxes_xyxy, b.boxes_xyxy, atol=1e-2, rtol=0)


@pytest.mark.parametrize("preset", TINY + [pytest.param(p, marks=pytest.mark.slow) for p in FULL])
def test_every_preset_exports_and_passes_the_check(preset, exports):
    """The export's own check runs onnxruntime, and OpenVINO (its IR) where installed."""
    job, checked, det = _checked(exports, preset)
    expected = ["onnxruntime"] + (["openvino"] if OPENVINO and job.options else [])
    assert [runtime for runtime, _, _ in checked.checks] == expected
    _compare(det, job.path)


def test_deploy_contract_at_opset_13_returns_what_predict_returns(exports):
    """topk=K through gathers (no GridSample below opset 16): the detections of
    ``Detector.predict`` before thresholding, boxes in pixels of the original images."""
    import onnx

    from detrkit.data.collate import images_to_batch

    job, checked, det = _checked(exports, DEPLOY)
    assert [runtime for runtime, _, _ in checked.checks] == ["onnxruntime"]
    k, path = dict(job.options)["topk"], job.path
    proto = onnx.load(str(path))
    assert next(o.version for o in proto.opset_import if o.domain == "") == 13
    assert "GridSample" not in {n.op_type for n in proto.graph.node}
    exported = ExportedModel(path)
    assert exported.contract == "deploy" and exported.metadata["msda"] == "gather"

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(120, 200), (260, 90)]]
    theirs = det.predict(images, threshold=0.0)
    batch = images_to_batch(
        [det._preprocess(det.read_image(im)) for im in images],
        orig_sizes=[im.shape[:2] for im in images],
    )
    scores, labels, boxes = (
        torch.from_numpy(a)
        for a in exported.run(
            {"images": batch.images, "mask": batch.mask, "orig_sizes": batch.orig_sizes}
        )
    )
    assert scores.shape == (2, k) and labels.dtype == torch.int64 and boxes.shape == (2, k, 4)
    for i, pred in enumerate(theirs):
        assert len(pred) == k  # threshold 0 keeps all k
        torch.testing.assert_close(scores[i], pred.scores, atol=1e-4, rtol=0)
        # the same labels, except where two ranks' scores tie within the tolerance
        assert labels_agree(labels[i : i + 1], pred.scores[None], pred.labels[None], 1e-4)
        same = labels[i] == pred.labels
        torch.testing.assert_close(boxes[i][same], pred.boxes_xyxy[same], atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"opset": 12}, "--opset: 12"),
        ({"msda": "bilinear"}, "--msda: 'bilinear'"),
        ({"opset": 15, "msda": "grid_sample"}, "needs opset >= 16"),
        ({"topk": 10**6}, "--postprocess topk=1000000"),
        ({"format": "tensorrt"}, "--format: 'tensorrt'"),
    ],
)
def test_bad_options_are_one_clear_error(options, match, tmp_path):
    det = Detector.from_preset("test_detr_tiny", device="cpu")
    with pytest.raises(ExportError, match=match):
        det.export(tmp_path / "m.onnx", **options)


def test_bad_output_paths_are_refused_before_tracing(tmp_path):
    det = Detector.from_preset("test_detr_tiny", device="cpu")
    with pytest.raises(ExportError, match="does not exist"):
        det.export(tmp_path / "missing" / "m.onnx")
    with pytest.raises(ExportError, match="must end in .onnx"):
        det.export(tmp_path / "m.pt")


def test_a_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # an import of it raises ImportError
    det = Detector.from_preset("test_detr_tiny", device="cpu")
    with pytest.raises(ExportError, match=r'pip install "detrkit\[export\]"'):
        det.export(tmp_path / "m.onnx")


def test_files_not_exported_by_detrkit_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    with pytest.raises(ExportError, match="not exported by detrkit"):
        Detector.from_onnx(tmp_path / "other.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a readable ONNX file"):
        Detector.from_onnx(tmp_path / "junk.onnx")


def test_cli_export_then_predict_with_the_file(tmp_path, capsys):
    import json

    from PIL import Image

    from detrkit.cli import main

    torch.manual_seed(0)
    stem = Detector.from_preset("test_detr_tiny", device="cpu").save(tmp_path / "ckpt")
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 120, 3), dtype=np.uint8)).save(
        image
    )
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(stem), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "check with onnxruntime" in printed and printed.count(": ok") == 2 and out.is_file()
    runs = {}
    for source in (["--checkpoint", str(stem)], ["--onnx", str(out)]):
        folder = tmp_path / source[0].strip("-")
        args = ["predict", str(image), *source, "--out", str(folder), "--threshold", "0"]
        assert main([*args, "--device", "cpu"] if source[0] == "--checkpoint" else args) == 0
        runs[source[0]] = json.loads((folder / "predictions.json").read_text())
    mine, theirs = runs["--onnx"], runs["--checkpoint"]
    assert len(mine) == len(theirs) > 0
    for a, b in zip(mine, theirs):
        assert a["category_id"] == b["category_id"]
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-2)
        np.testing.assert_allclose(a["score"], b["score"], atol=1e-4)
    bad = ["export", "--checkpoint", str(stem), "--out", str(out), "--postprocess", "top=3"]
    assert main(bad) == 2
    assert "expected topk=K" in capsys.readouterr().err


def test_cli_export_that_fails_its_check_exits_1_and_keeps_the_file(tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    """A runtime that computes the logits 1e-3 off (as a miscompiled op would) is caught."""
    from detrkit.cli import main

    torch.manual_seed(0)
    stem = Detector.from_preset("test_detr_tiny", device="cpu").save(tmp_path / "ckpt")
    run = ExportedModel.run

    def off_by_1e3(self, feeds):
        logits, *rest = run(self, feeds)
        return [logits + 1e-3, *rest]

    monkeypatch.setattr(ExportedModel, "run", off_by_1e3)
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(stem), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out + captured.err and "kept for inspection" in captured.err
    assert out.is_file()
    assert read_export(out)[0]["contract"] == "raw"  # a complete file, readable
