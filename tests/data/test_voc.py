from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.boxes import cxcywh_to_xyxy
from detrkit.data import DatasetError
from detrkit.data.check import check_dataset
from detrkit.data.voc import VocDetection, read_voc_xml

NEON = Path(__file__).resolve().parents[3] / "shared" / "data" / "neon-trees"

XML = """<annotation>
  <filename>{filename}</filename>
  <size><width>50</width><height>40</height><depth>3</depth></size>
  <object><name>{name}</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>11</ymin><xmax>20</xmax><ymax>40</ymax></bndbox></object>
  <object><name>Tree</name><difficult>1</difficult>
    <bndbox><xmin>30</xmin><ymin>5</ymin><xmax>50</xmax><ymax>15</ymax></bndbox></object>
</annotation>
"""


def _write(root: Path, stem: str, filename: str, name: str = "Tree") -> None:
    (root / f"{stem}.xml").write_text(XML.format(filename=filename, name=name))
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / f"{stem}.png")


def test_voc_boxes_classes_and_difficult(tmp_path):
    _write(tmp_path, "a", "a.tif", name="Dead")  # the XML names a .tif; the .png is used
    _write(tmp_path, "b", "b.png")
    ds = VocDetection(tmp_path, tmp_path, train=True, converted_file=tmp_path / "c.json")
    assert ds.label_map.names == ["Dead", "Tree"] and ds.label_map.category_ids == [1, 2]
    assert ds.annotations_file == tmp_path / "c.json"
    _, target = ds[0]
    assert target.labels.tolist() == [0]  # the difficult box is left out (iscrowd)
    h, w = target.size
    # 1-based inclusive xmin=1..xmax=20 -> pixel edges 0..20
    torch.testing.assert_close(
        cxcywh_to_xyxy(target.boxes) * torch.tensor([w, h, w, h]), torch.tensor([[0.0, 10, 20, 40]])
    )
    merged = VocDetection(
        tmp_path, tmp_path, train=False, rename={"Dead": "Tree"}, converted_file=tmp_path / "m.json"
    )
    assert merged.label_map.names == ["Tree"] and merged[0][1].labels.tolist() == [0]


def test_voc_errors_name_the_file(tmp_path):
    (tmp_path / "x.xml").write_text("<annotation><filename>x.png</filename>\n<object>")
    with pytest.raises(DatasetError, match=r"x\.xml: malformed XML at line 2"):
        read_voc_xml(tmp_path / "x.xml")
    _write(tmp_path, "y", "y.png")
    (tmp_path / "x.xml").unlink()
    (tmp_path / "y.png").unlink()
    with pytest.raises(DatasetError, match=r"y\.xml: image 'y\.png' not found"):
        VocDetection(tmp_path, tmp_path, train=True, converted_file=tmp_path / "c.json")
    _write(tmp_path, "y", "y.png", name="Bush")
    with pytest.raises(DatasetError, match="class 'Bush' is not in class_names"):
        VocDetection(
            tmp_path, tmp_path, train=True, class_names=["Tree"], converted_file=tmp_path / "c.json"
        )


@pytest.mark.skipif(not NEON.is_dir(), reason="the neon-trees sample data is not present")
def test_neon_trees_sample(tmp_path):
    files = [NEON / "OSBS_029.xml", NEON / "SOAP_061.xml"]
    ds = VocDetection(
        NEON,
        files,
        train=True,
        rename={"Alive": "Tree", "Dead": "Tree"},
        converted_file=tmp_path / "neon.json",
    )
    assert len(ds) == 2 and ds.label_map.names == ["Tree"]
    counts = [len(ds[i][1]) for i in range(2)]
    assert counts == [61, 37]
    boxes = ds[0][1].boxes
    assert (boxes[:, 2:] > 0).all() and (cxcywh_to_xyxy(boxes) <= 1).all()


def test_check_dataset_reads_voc_folders(tmp_path):
    _write(tmp_path, "a", "a.png")
    (tmp_path / "a.xml").write_text(
        XML.format(filename="a.png", name="Tree").replace("<xmax>20</xmax>", "<xmax>70</xmax>")
    )  # 20 px beyond the 50 px wide image
    report = check_dataset(tmp_path, tmp_path)
    assert f"annotations: {tmp_path} (Pascal VOC)" in report
    assert "2 (1 boxes used for training, 1 crowd, 0 dropped)" in report
    assert f"{tmp_path} (Pascal VOC): clipped 1 boxes" in report
