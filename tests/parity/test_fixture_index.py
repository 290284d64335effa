"""The fixture folder itself: what is found is what the folder promises, every family has a
converter, and a missing or broken folder fails loudly instead of emptying the parity suite."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from detrkit.convert import available_families
from tests.conftest import (
    REPO,
    FixtureFolderError,
    fixture_family,
    fixture_names,
    fixtures_dir,
    indexed_fixture_names,
    load_fixture,
)
from tests.parity._support import names

pytestmark = pytest.mark.parity

ALL = names()
PARITY_DIR = Path(__file__).resolve().parent


def test_fixtures_found_are_the_folder_index() -> None:
    found = fixture_names()
    index = indexed_fixture_names()
    if index is not None:
        assert found == index, "fixtures found differ from the README's '### Fixtures' table"
        return
    assert found
    folders = sorted(p.name for p in fixtures_dir().iterdir() if p.is_dir() and p.name != "common")
    assert folders == found, "sub-folders without a fixture.json"


@pytest.mark.parametrize("name", ALL)
def test_family_has_a_converter(name: str) -> None:
    family = fixture_family(name)
    assert family in available_families(), f"{name}: no converter for family '{family}'"


@pytest.mark.parametrize("name", ALL)
def test_inputs_are_consistent(name: str) -> None:
    """``inputs.image_sizes`` is the unpadded part of ``inputs.mask``; the batch is the one
    ``fixture.json`` describes."""
    fx = load_fixture(name)
    t = fx.tensors
    mask, sizes = t["inputs.mask"], t["inputs.image_sizes"]
    assert sizes.tolist() == fx.meta["inputs"]["image_sizes_hw"]
    assert list(t["inputs.images"].shape[-2:]) == fx.meta["inputs"]["padded_hw"]
    for b, (h, w) in enumerate(sizes.tolist()):
        assert not mask[b, :h, :w].any() and mask[b].sum() == mask[b].numel() - h * w
        assert (t["inputs.images"][b][:, mask[b]] == 0).all()


# every stored tensor and the test that compares it; a new kind of field fails
# test_every_stored_tensor_is_compared until a test reads it
COMPARED = {
    r"inputs\.(images|mask|image_sizes)": "test_inputs_are_consistent, every forward",
    r"outputs(_fp64)?\.(aux_outputs\.\d+\.|enc_outputs\.|interm_outputs\."
    r"|interm_outputs_for_matching_pre\.)?pred_(logits|boxes)": "test_model_parity",
    r"taps\.transformer_return\.\d": "test_taps",
    r"targets\.\d+\.(labels|boxes)": "test_criterion_parity, test_denoising_parity",
    r"loss\.indices\.(final|aux_\d+|enc|interm)\.\d+\.(src|tgt)": "test_matching_identical",
    r"postprocess\.(target_sizes|\d+\.(scores|labels|boxes|topk_indexes))": "test_postprocess",
    r"train_dn\.(attn_mask|dn_query_positions|mask_dict\.(known_indice|batch_idx"
    r"|map_known_indice|known_labels|known_bboxs))": "test_layout_matches_official",
    r"train_dn\.(noised_labels|noised_boxes_cxcywh)": "test_seeded_noise_gives_the_official_...",
    r"train_dn\.input_query_(label|bbox)": "test_stored_noised_targets_embed_to_the_...",
    r"train_dn\.(dn_outputs\.(pred_(logits|boxes)_all_layers|(aux_outputs\.\d+\.)?pred_"
    r"(logits|boxes))|outputs\.(aux_outputs\.\d+\.|interm_outputs\."
    r"|interm_outputs_for_matching_pre\.)?pred_(logits|boxes))": "test_injected_queries_...",
}


@pytest.mark.parametrize("name", ALL)
def test_every_stored_tensor_is_compared(name: str) -> None:
    unknown = [
        k for k in load_fixture(name).tensors if not any(re.fullmatch(p, k) for p in COMPARED)
    ]
    assert unknown == [], "fixture tensors no parity test reads"


def test_missing_or_empty_folder_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DETRKIT_PARITY_FIXTURES", str(tmp_path / "typo"))
    with pytest.raises(FixtureFolderError, match="not a folder"):
        fixture_names()
    monkeypatch.setenv("DETRKIT_PARITY_FIXTURES", str(tmp_path))
    with pytest.raises(FixtureFolderError, match="no \\*/fixture.json"):
        fixture_names()


def _start_collection(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "DETRKIT_PARITY_FIXTURES": str(folder)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            str(PARITY_DIR),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def collections(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """``pytest --collect-only tests/parity`` (both at once, in subprocesses) with a folder that
    does not exist and with a copy of the folder plus a fixture whose ``fixture.json`` is
    broken: ``{case: (returncode, output)}``."""
    root = tmp_path_factory.mktemp("fixtures")
    broken = root / "with_broken"
    broken.mkdir()
    for entry in fixtures_dir().iterdir():
        (broken / entry.name).symlink_to(entry.resolve())
    (broken / "zz_broken").mkdir()
    (broken / "zz_broken" / "fixture.json").write_text("{not json")
    running = {"typo": _start_collection(root / "typo"), "broken": _start_collection(broken)}
    out = {}
    for case, proc in running.items():
        text, _ = proc.communicate(timeout=600)
        out[case] = (proc.returncode, text)
    return out


def test_collection_fails_in_every_module_for_a_wrong_folder(collections) -> None:
    """A typo in ``DETRKIT_PARITY_FIXTURES``: every parity module fails to collect (none
    silently becomes an empty parametrisation)."""
    code, text = collections["typo"]
    assert code != 0
    modules = sorted(p.name for p in PARITY_DIR.glob("test_*.py"))
    failed = [m for m in modules if f"ERROR tests/parity/{m}" in text]
    assert failed == modules, text[-3000:]
    assert "FixtureFolderError" in text


def test_a_broken_fixture_fails_alone(collections) -> None:
    """A fixture with an unreadable ``fixture.json`` does not break collection: every module
    collects, the broken fixture is still parametrised (its tests fail when run)."""
    code, text = collections["broken"]
    assert code == 0, text[-3000:]
    assert "test_outputs_float32[zz_broken]" in text and "test_taps[zz_broken]" in text
