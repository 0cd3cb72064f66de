"""The evaluation's detector, checked against the renderer's ground truth."""

import numpy as np

from prompt2prompt.shapes import world
from prompt2prompt.shapes.evaluate import _fill_holes, detect, detector_accuracy


def test_detector_on_rendered_scenes():
    acc = detector_accuracy(80, seed=1)
    assert acc["found"] == 1.0 and acc["size"] >= 0.95
    assert acc["shape"] >= 0.95 and acc["colour"] >= 0.93 and acc["pattern"] >= 0.85


def test_detector_finds_two_objects_with_their_masks():
    spec = world.make_spec([dict(shape="square", colour="red", size="big"), dict(shape="circle", colour="yellow", size="small")],
                           "blue", relation="left of", seed=3)
    scene = world.render(spec)
    found = sorted(detect(scene.image, "blue"), key=lambda d: d.centroid[0])
    assert [(d.shape, d.colour, d.size) for d in found] == [("square", "red", "big"), ("circle", "yellow", "small")]
    for d, truth in zip(found, scene.masks):
        iou = (d.mask & truth).sum() / (d.mask | truth).sum()
        assert iou > 0.9


def test_fill_holes():
    m = np.zeros((8, 8), bool)
    m[1:6, 1:6] = True
    m[3, 3] = False
    assert _fill_holes(m)[3, 3] and not _fill_holes(m)[7, 7]
