"""The model zoo: one tiny, seeded instance of each architecture family dlbjax explains, and the
measurement the zoo test asserts and ``tools/zoo_table.py`` publishes in README ("Models tested").

Each entry builds ``(model, inputs)`` with seeded random weights (no hub access) and names the
options it needs (task, explained output). :func:`measure` explains it in both modes and returns
the numbers: forward error against torch, finiteness, relevance at padded tokens, and the shares
of the seed at the inputs, biases, learned tensors (``params``) and lost, per mode (the worst row).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torchvision
import transformers as tf
from torchvision.models import segmentation as tv_seg
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.efficientnet import MBConvConfig
from torchvision.models.regnet import BlockParams
from torchvision.models.resnet import BasicBlock

import dlbjax
import hf_zoo
from conftest import randomize_bn
from test_moe import tiny_moe


@dataclasses.dataclass(frozen=True)
class Entry:
    family: str
    build: Callable  # () -> (model, inputs)
    options: dict = dataclasses.field(default_factory=dict)


def _image(ctor, size=32, batch=2):
    def build():
        torch.manual_seed(0)
        model = ctor().eval()
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        return model, x
    return build


def _hf(name):
    def build():
        model = hf_zoo.tiny(name)
        x = hf_zoo.inputs(name)
        if "attention_mask" in x:  # right padding on row 1: padded tokens must get exactly 0
            x["attention_mask"][1, -3:] = 0
        return model, x
    return build


def _moe(name):
    def build():
        model = tiny_moe(name)
        g = torch.Generator().manual_seed(1)
        return model, {"input_ids": torch.randint(3, 100, (2, 6), generator=g), "use_cache": False}
    return build


def _swin():
    torch.manual_seed(0)
    model = tf.SwinForImageClassification(tf.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
        num_labels=3)).eval()
    return model, {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def _wav2vec2():
    torch.manual_seed(0)
    model = tf.Wav2Vec2ForSequenceClassification(tf.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, num_labels=3, classifier_proj_size=16,
        attn_implementation="sdpa")).eval()
    return model, {"input_values": torch.randn(2, 400, generator=torch.Generator().manual_seed(1))}


def _xlnet():
    torch.manual_seed(0)
    model = tf.XLNetForSequenceClassification(tf.XLNetConfig(
        vocab_size=128, d_model=32, n_layer=2, n_head=4, d_inner=64, num_labels=3)).eval()
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # XLNet pads on the left: it classifies from the last position
    return model, {"input_ids": torch.randint(3, 128, (2, 8), generator=g), "attention_mask": mask}


def _mamba():
    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=128, hidden_size=16, state_size=4,
                                               num_hidden_layers=2, expand=2, conv_kernel=3)).eval()
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    return model, {"input_ids": torch.randint(3, 128, (2, 6), generator=g), "attention_mask": mask}


def _jetmoe():
    torch.manual_seed(0)
    model = tf.JetMoeForCausalLM(tf.JetMoeConfig(
        hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
        max_position_embeddings=64)).eval()
    g = torch.Generator().manual_seed(1)
    return model, {"input_ids": torch.randint(3, 128, (2, 6), generator=g), "use_cache": False}


def _t5():
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0  # right padding of the source
    return model, {"input_ids": ids, "attention_mask": mask,
                   "decoder_input_ids": torch.randint(3, 128, (2, 4), generator=g)}


class LSTMHead(nn.Module):
    """The common classifier on the final hidden state: ``fc(h_n[-1])``."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.fc(h[-1])


def _lstm():
    torch.manual_seed(0)
    return LSTMHead().eval(), torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))


ZOO: dict[str, Entry] = {
    # torchvision families at reduced depth/width (their own block classes and init)
    "ResNet (BasicBlock x4)": Entry("CNN", _image(lambda: torchvision.models.ResNet(
        BasicBlock, [1, 1, 1, 1], num_classes=5))),
    "DenseNet (2 blocks)": Entry("CNN", _image(lambda: torchvision.models.DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5))),
    "EfficientNet (2 MBConv, SE)": Entry("CNN", _image(lambda: torchvision.models.EfficientNet(
        [MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(4, 3, 2, 16, 24, 1)], dropout=0.2,
        num_classes=5, last_channel=64))),
    "ConvNeXt (2 stages)": Entry("CNN", _image(lambda: torchvision.models.ConvNeXt(
        [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5))),
    "RegNetY (SE, groups)": Entry("CNN", _image(lambda: torchvision.models.RegNet(
        BlockParams.from_init_params(depth=2, w_0=16, w_a=8.0, w_m=2.0, group_width=8,
                                     se_ratio=0.25), num_classes=5, stem_width=16))),
    # randomised batch-norm statistics: as built, its logits are the classifier's bias alone
    "GoogLeNet (Inception v1)": Entry("CNN", _image(lambda: randomize_bn(
        torchvision.models.googlenet(num_classes=5, aux_logits=False, init_weights=False)))),
    # MobileNetV3 (hardswish, SE) is the LRASPP backbone
    "lraspp_mobilenet_v3_large": Entry("segmentation", _image(
        lambda: tv_seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                 num_classes=3)),
        {"task": "segmentation", "output": "out"}),
    # (the rest run in test_zoo_sequences.py)
    "ViT (HF)": Entry("vision transformer", _hf("vit")),
    "Swin (HF)": Entry("vision transformer", _swin),
    "BERT (HF)": Entry("encoder", _hf("bert")),
    "DistilBERT (HF)": Entry("encoder", _hf("distilbert")),
    "XLNet (HF)": Entry("encoder", _xlnet),
    "LLaMA (HF)": Entry("decoder", _hf("llama")),
    "Qwen3-MoE (HF)": Entry("MoE decoder", _moe("qwen3_moe")),
    "JetMoE (HF, substituted)": Entry("MoE decoder", _jetmoe),
    "T5 (HF, decoder_input_ids)": Entry("encoder-decoder", _t5),
    "Mamba (HF)": Entry("state-space", _mamba),
    "Wav2Vec2 (HF)": Entry("audio", _wav2vec2),
    "LSTM on h_n": Entry("recurrent", _lstm),
}


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _reference(model, inputs, output):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, dict) and output is not None:
        out = out[output]
    elif hasattr(out, "logits"):
        out = out.logits
    return out.numpy()


def _streams(v):
    return (np.asarray(v.positive), np.asarray(v.negative)) if isinstance(v, dlbjax.Streams) \
        else (np.asarray(v),)


def measure(name: str) -> dict:
    """Explain zoo entry ``name`` in both modes; the numbers the zoo test checks."""
    entry = ZOO[name]
    model, inputs = entry.build()
    ref = _reference(model, inputs, entry.options.get("output"))
    ex = dlbjax.Explainer(model, inputs, **entry.options)
    result = {"family": entry.family}
    for mode in ("default", "contrastive"):
        e = (ex if mode == "default" else ex.replace(mode="contrastive"))(inputs)
        c = e.conservation
        seed = sum(_streams(c.seed))
        total = np.where(seed != 0, seed, 1.0)
        # shares of the seed (both streams together): mean over rows; lost: the worst row
        shares = {f: float(np.mean(sum(_streams(getattr(c, f))) / total))
                  for f in ("inputs", "bias", "params")}
        shares["lost"] = float(np.max(np.abs(sum(_streams(c.lost))) / total))
        finite = all(np.isfinite(r).all() for v in e.relevance.values() for r in _streams(v))
        padded = 0.0
        if isinstance(inputs, dict) and "attention_mask" in inputs and "input_ids" in e.relevance:
            mask = inputs["attention_mask"].numpy() == 0
            padded = max(float(np.abs(r[mask]).max()) if mask.any() else 0.0
                         for r in _streams(e.relevance["input_ids"]))
        result[mode] = dict(forward=_rel_err(e.prediction, ref), finite=bool(finite),
                            padded=padded, **shares)
    return result


IMAGE_MODELS = [n for n in ZOO if ZOO[n].family in ("CNN", "segmentation")]
SEQUENCE_MODELS = [n for n in ZOO if n not in IMAGE_MODELS]


def check(name: str) -> dict:
    """The zoo test's assertions on :func:`measure` (shared by the two zoo test files)."""
    r = measure(name)
    for mode in ("default", "contrastive"):
        m = r[mode]
        assert m["forward"] <= 1e-5, (name, mode, m["forward"])
        assert m["finite"], (name, mode)
        assert m["padded"] == 0.0, (name, mode, m["padded"])
        assert m["lost"] <= 1e-3, (name, mode, m["lost"])
        assert m["inputs"] > 0, (name, mode)
        np.testing.assert_allclose(m["inputs"] + m["bias"] + m["params"], 1.0, atol=2e-3)
    return r
