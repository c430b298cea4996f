import io

import numpy as np
from helpers import TEST_SCHEME
from PIL import Image

from quicknat.data.phantom import make_phantom
from quicknat.report import curves_png, save_overlay


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_overlay_of_native_scan_and_labels(tmp_path):
    img, lab = make_phantom((64, 64, 64), (2.5, 2.5, 2.5), "RAS", seed=1)
    plain = save_overlay(img, None, tmp_path / "plain.png", title="phantom")
    labelled = save_overlay(img, lab, tmp_path / "labelled.png", title="phantom")
    a, b = _png(plain.read_bytes()), _png(labelled.read_bytes())
    assert a.shape[0] == b.shape[0] and a.shape[1] > 2 * a.shape[0]  # three panels side by side
    assert b.shape[1] > a.shape[1]  # and the legend in a panel of its own beside them
    b = b[:, : a.shape[1]]
    colour = np.abs(b[..., 0].astype(int) - b[..., 2].astype(int)) > 40  # labels tint the picture
    assert colour.mean() > 3 * max(np.mean(np.abs(a[..., 0].astype(int) - a[..., 2].astype(int)) > 40), 1e-3)


def test_overlay_of_conformed_arrays(tmp_path):
    image = np.zeros((32, 32, 32), np.float32)
    image[8:24, 8:24, 8:24] = 1.0
    classes = np.zeros((32, 32, 32), np.uint8)
    classes[8:16, 8:24, 8:24] = 1
    out = save_overlay(None, None, tmp_path / "o.png", scheme=TEST_SCHEME, conformed=(image, classes))
    assert _png(out.read_bytes()).mean() > 0


def test_curves_png():
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_dice_loss": 0.5 / e, "train_ce": 0.5 / e,
                "val_dice_mean": 0.2 * e, "lr": 0.01} for e in (1, 2, 3)]
    assert _png(curves_png(history, "coronal")).shape[0] > 100
