"""Training learns: the demo's recipe (DINO-tiny from random weights) on 16 synthetic images,
evaluated on the same images. The full demo (AP50 >= 0.5 on held-out images, about five
minutes) is the ``slow`` test in tests/test_cli.py; this is its one-minute version."""

from __future__ import annotations

from detrkit.config import SyntheticConfig
from detrkit.data.synthetic import generate_shapes
from detrkit.demo import demo_config
from detrkit.engine import Trainer


def test_the_demo_recipe_fits_a_small_training_set(tmp_path):
    paths = generate_shapes(
        tmp_path / "data", SyntheticConfig(num_train=16, num_val=8, image_size=96, seed=0)
    )
    train = [
        f"data.train_images={paths.train_images}",
        f"data.train_annotations={paths.train_annotations}",
    ]
    cfg = demo_config(
        tmp_path,
        epochs=30,
        overrides=[
            "data.format=coco",
            *train,
            f"data.val_images={paths.train_images}",
            f"data.val_annotations={paths.train_annotations}",
            "train.eval_every=30",
            "data.augment.hflip=false",
            "data.augment.train_scales=[96]",
            "train.device=cpu",
        ],
    )
    trainer = Trainer(cfg, progress=False, echo=None)
    before = trainer.evaluate()["AP50"]
    after = trainer.fit().history[-1]["eval"]["AP50"]
    # measured 2026-12-02 with train.seed 42 / 1 / 2: AP50 0.53 / 0.88 / 0.69 (untrained 0.0)
    assert before < 0.05 and after >= 0.3
