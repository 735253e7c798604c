"""torchvision detectors: the full model raises a typed ExportError that points to the recipe, and
the recipe (backbone + head on the fixed anchor behind one detection) explains.

The recipe, as in ``notebooks/07_detection.ipynb``:

1. Build the detector with ``min_size = max_size =`` the image size, so that its
   ``GeneralizedRCNNTransform`` only normalises (no resize), and apply ``detector.transform``
   outside the explained module: relevance is on the normalised image, on the input's pixel grid.
2. Run the detector in torch (eager) and pick a detection (box, score, label).
3. Recover the anchor behind it: RetinaNet's postprocess scores every (anchor, class) with
   ``sigmoid(cls_logits)``, decodes the anchor's deltas with ``box_coder`` and clips them to the
   image, so the anchor is the one whose score and decoded box equal the detection's
   (:func:`anchor_of`; the match is exact, up to float rounding). FCOS is the same with its
   score sqrt(sigmoid(cls) * sigmoid(centerness)) and its linear box coder.
4. Explain :class:`AnchorHead`: ``head(list(backbone(x).values()))`` has static shapes (all
   anchors, no threshold, no NMS); it returns that anchor's class logit ([N, 1], ``task="binary"``:
   RetinaNet scores classes with independent sigmoids, so contrastive mode is R+ = M sigma(o),
   R- = M (1 - sigma(o))) or its 4 box deltas ([N, 4], ``task="bbox-regression"``: M / 4 per
   delta, or ``target=`` some of them; contrastive mode is not defined for regression).

Faster R-CNN has no such recipe: ``MultiScaleRoIAlign`` maps boxes to pyramid levels with
``nonzero`` (ExportError), and ``torchvision.ops.roi_align`` on one level has no lowering or rule
(UnsupportedOperationError naming ``torchvision.roi_align.default``); both are asserted here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import dlbjax
from conftest import rel_err, stream_totals

SIZE = 64



def stream_totals(c, field):
    v = getattr(c, field)
    return (np.asarray(v.positive), np.asarray(v.negative)) if isinstance(v, dlbjax.Streams) \
        else (np.asarray(v),)


class AnchorHead(nn.Module):
    """A RetinaNet's (or FCOS's) backbone and head, read at one anchor: ``logit``, the logit of
    ``label`` ([N, 1]), and ``box``, the four box deltas ([N, 4]). ``output=`` picks the one to
    explain; ``Explainer.replace(output=..., task=...)`` switches without exporting again."""

    def __init__(self, detector, anchor: int, label: int):
        super().__init__()
        self.backbone, self.head = detector.backbone, detector.head
        self.anchor, self.label = anchor, label

    def forward(self, x):
        out = self.head(list(self.backbone(x).values()))
        return {"logit": out["cls_logits"][:, self.anchor, self.label:self.label + 1],
                "box": out["bbox_regression"][:, self.anchor]}


def anchors_and_boxes(detector, x):
    """All anchors of image batch ``x`` (already transformed), with row 0's per-class scores and
    decoded, clipped boxes: exactly what the detector's postprocess ranks (RetinaNet:
    sigmoid(cls); FCOS: sqrt(sigmoid(cls) * sigmoid(centerness)))."""
    with torch.no_grad():
        feats = list(detector.backbone(x).values())
        out = detector.head(feats)
        images = ImageList(x, [tuple(x.shape[-2:])] * len(x))
        anchors = detector.anchor_generator(images, feats)[0]
        scores = torch.sigmoid(out["cls_logits"][0])
        if isinstance(detector, FCOS):
            boxes = detector.box_coder.decode(out["bbox_regression"][0], anchors)
            scores = torch.sqrt(scores * torch.sigmoid(out["bbox_ctrness"][0]))
        else:
            boxes = detector.box_coder.decode_single(out["bbox_regression"][0], anchors)
        boxes = torchvision.ops.clip_boxes_to_image(boxes, tuple(x.shape[-2:]))
        return anchors, scores, boxes


def anchor_of(detector, x, box, score, label) -> int:
    """The anchor behind one detection of row 0: the same label's score and the same box."""
    _, scores, boxes = anchors_and_boxes(detector, x)
    err = (boxes - box).abs().amax(1) + (scores[:, label] - score).abs()
    return int(err.argmin())


def _backbone():
    torch.manual_seed(0)
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                               returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))


def tiny_retinanet():
    return RetinaNet(_backbone(), num_classes=3, min_size=SIZE, max_size=SIZE,
                     score_thresh=0.0).eval()


@pytest.fixture(scope="module")
def setup():
    det = tiny_retinanet()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    with torch.no_grad():
        detections = det(images)
        x = det.transform(images)[0].tensors            # normalised, not resized: [2, 3, 64, 64]
    d = detections[0]
    box, score, label = d["boxes"][0], d["scores"][0], int(d["labels"][0])  # the top detection
    a = anchor_of(det, x, box, score, label)  # the batch the detector ran: same kernels, same bits
    model = AnchorHead(det, a, label).eval()
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model(x).items()}
    explainer = dlbjax.Explainer(model, x[:1], output="logit", task="binary")
    return dict(det=det, x=x, box=box, score=score, label=label, anchor=a, ref=ref,
                explainer=explainer)


def test_the_full_detector_raises_an_export_error_that_points_to_the_recipe():
    det = tiny_retinanet()
    with pytest.raises(dlbjax.ExportError, match="07_detection"):
        dlbjax.explain(det, torch.rand(1, 3, SIZE, SIZE))


def test_the_anchor_is_the_one_behind_the_detection(setup):
    det, x, a = setup["det"], setup["x"], setup["anchor"]
    # row 0 of the batch the detector itself ran (a batch of one may round differently in torch)
    _, scores, boxes = anchors_and_boxes(det, x)
    torch.testing.assert_close(boxes[a], setup["box"], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[a, setup["label"]], setup["score"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_the_anchor_logit_explains(setup, mode):
    x, ref = setup["x"], setup["ref"]["logit"]
    ex = setup["explainer"] if mode == "default" else setup["explainer"].replace(mode=mode)
    out = ex(x)
    assert rel_err(out.prediction, ref) <= 1e-5
    # the logit is the detection's score before its sigmoid
    np.testing.assert_allclose(1 / (1 + np.exp(-out.prediction[0, 0])), float(setup["score"]),
                               rtol=1e-5)
    c = out.conservation
    for lost, seed in zip(stream_totals(c, "lost"), stream_totals(c, "seed")):
        assert np.abs(lost).max() <= 1e-3 * np.abs(seed).max()
    (rel,) = out.relevance.values()
    streams = (rel.positive, rel.negative) if mode == "contrastive" else (rel,)
    for r in streams:
        r = np.asarray(r)
        assert r.shape == tuple(x.shape) and np.isfinite(r).all()
    if mode == "default":  # a batch equals one call per row (one more compilation: 1 row)
        for b in range(len(x)):
            np.testing.assert_allclose(np.asarray(rel)[b:b + 1],
                                       np.asarray(ex(x[b:b + 1]).relevance["x"]), rtol=1e-5,
                                       atol=1e-6)


def test_the_anchor_box_explains_with_the_bbox_task(setup):
    det, x, a, ref = setup["det"], setup["x"], setup["anchor"], setup["ref"]["box"]
    ex = setup["explainer"].replace(output="box", task="bbox-regression")
    out = ex(x)
    assert rel_err(out.prediction, ref) <= 1e-5
    # dlbjax's deltas, decoded with the detector's box coder at the anchor, give the detected box
    anchors, _, _ = anchors_and_boxes(det, x[:1])
    box = det.box_coder.decode_single(torch.tensor(np.asarray(out.prediction[:1])),
                                      anchors[a:a + 1])
    box = torchvision.ops.clip_boxes_to_image(box, (SIZE, SIZE))[0]
    torch.testing.assert_close(box, setup["box"], rtol=0, atol=1e-4)
    c = out.conservation
    np.testing.assert_allclose(c.seed, 100.0, rtol=1e-6)
    assert np.abs(np.asarray(c.lost)).max() <= 1e-3 * 100.0
    r = np.asarray(out.relevance["x"])
    assert r.shape == tuple(x.shape) and np.isfinite(r).all()
    # one coordinate at a time: target = its index in the [4] row
    dy = ex(x, target=[1])
    np.testing.assert_allclose(dy.conservation.seed, 100.0, rtol=1e-6)
    assert np.abs(np.asarray(dy.conservation.lost)).max() <= 1e-3 * 100.0
    with pytest.raises(dlbjax.TargetError):   # contrastive mode is not defined for regression
        ex.replace(mode="contrastive")(x[:1])


def test_fcos_follows_the_same_recipe():
    det = FCOS(_backbone(), num_classes=3, min_size=SIZE, max_size=SIZE, score_thresh=0.0).eval()
    img = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        d = det([img])[0]
        x = det.transform([img])[0].tensors
    box, score, label = d["boxes"][0], d["scores"][0], int(d["labels"][0])
    a = anchor_of(det, x, box, score, label)
    _, scores, boxes = anchors_and_boxes(det, x)
    torch.testing.assert_close(boxes[a], box, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[a, label], score, rtol=0, atol=1e-7)
    model = AnchorHead(det, a, label).eval()
    with torch.no_grad():
        ref = model(x)["logit"].numpy()
    out = dlbjax.explain(model, x, output="logit", task="binary")
    assert rel_err(out.prediction, ref) <= 1e-5
    assert abs(float(out.conservation.lost[0])) <= 1e-3 * 100.0
    r = np.asarray(out.relevance["x"])
    assert r.shape == tuple(x.shape) and np.isfinite(r).all()


class _RoIHead(nn.Module):
    def __init__(self, det, boxes, pool):
        super().__init__()
        self.det, self.pool = det, pool
        self.register_buffer("boxes", boxes)

    def forward(self, x):
        feats = self.det.backbone(x)
        if self.pool == "multiscale":
            pooled = self.det.roi_heads.box_roi_pool(feats, [self.boxes], [tuple(x.shape[-2:])])
        else:
            pooled = torchvision.ops.roi_align(feats["0"], [self.boxes], output_size=7,
                                               spatial_scale=0.25, sampling_ratio=2)
        logits, _ = self.det.roi_heads.box_predictor(self.det.roi_heads.box_head(pooled))
        return logits


def test_faster_rcnn_on_fixed_boxes_raises_typed_errors():
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    det = FasterRCNN(backbone, num_classes=3, min_size=SIZE, max_size=SIZE).eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    boxes = torch.tensor([[4.0, 4.0, 40.0, 40.0], [10.0, 20.0, 60.0, 50.0]])
    with pytest.raises(dlbjax.ExportError, match="nonzero"):   # pyramid level per box
        dlbjax.explain(_RoIHead(det, boxes, "multiscale").eval(), x)
    with pytest.raises(dlbjax.UnsupportedOperationError) as err:
        dlbjax.explain(_RoIHead(det, boxes, "single-level").eval(), x)
    assert {u.op for u in err.value.ops} == {"torchvision.roi_align.default"}
