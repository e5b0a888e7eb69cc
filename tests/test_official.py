"""Official GLIP checkpoint names map onto the glip-t preset."""

import pytest
import torch

from glipv2.checkpoint import CheckpointError
from glipv2.config import get_preset
from glipv2.modeling.glipv2 import build_model
from glipv2.official import convert_official_state_dict, load_official


def _official_names_for(model):
    """An official-style state dict for the parts GLIP-T shares with this model, written
    with the official names (microsoft/GLIP vldyhead.py, fuse_helper.py, swint.py)."""
    own = model.state_dict()
    official = {}
    for k, v in own.items():
        if k.startswith("backbone."):
            official["module.backbone.body." + k[len("backbone."):]] = torch.randn_like(v.float()).to(v.dtype)
        elif k.startswith("fpn."):
            official["module.backbone.fpn." + k[len("fpn."):]] = torch.randn_like(v)
        elif k.startswith("language.model."):
            official["module.language_backbone.body.model." + k[len("language.model."):]] = torch.randn_like(v.float()).to(v.dtype)
        elif k.startswith("head.fusion."):
            layer, rest = k[len("head.fusion."):].split(".", 1)
            official[f"module.rpn.head.dyhead_tower.{3 * int(layer)}.b_attn.{rest}"] = torch.randn_like(v)
    d = own["head.text_layers.0.linear1.weight"].shape[1]
    for layer in range(6):
        base = f"module.rpn.head.dyhead_tower.{3 * layer + 1}."
        for part in ("query", "key", "value"):
            official[base + f"attention.self.{part}.weight"] = torch.randn(d, d)
            official[base + f"attention.self.{part}.bias"] = torch.randn(d)
        for name, shape in [("attention.output.dense", (d, d)), ("intermediate.dense", (4 * d, d)),
                            ("output.dense", (d, 4 * d))]:
            official[base + name + ".weight"] = torch.randn(*shape)
            official[base + name + ".bias"] = torch.randn(shape[0])
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            official[base + name + ".weight"] = torch.randn(d)
            official[base + name + ".bias"] = torch.randn(d)
        official[f"module.rpn.head.dyhead_tower.{3 * layer + 2}.DyConv.1.conv.weight"] = torch.randn(256, 256, 3, 3)
    official["module.rpn.head.bbox_pred.weight"] = torch.randn(4, 256, 1, 1)
    official["module.rpn.head.bbox_pred.bias"] = torch.randn(4)
    official["module.rpn.head.centerness.weight"] = torch.randn(1, 256, 1, 1)
    official["module.rpn.head.centerness.bias"] = torch.randn(1)
    official["module.rpn.head.cls_logits.weight"] = torch.randn(80, 256, 1, 1)
    official["module.rpn.head.dot_product_projection_text.weight"] = torch.randn(256, d)
    official["module.rpn.head.dot_product_projection_text.bias"] = torch.randn(256)
    for name, shape in [("log_scale", (1,)), ("bias_lang", (d,)), ("bias0", (1,))]:
        official[f"module.rpn.head.{name}"] = torch.randn(*shape)
    for i in range(5):
        official[f"module.rpn.head.scales.{i}.scale"] = torch.randn(1)
    official["module.language_backbone.body.model.pooler.dense.weight"] = torch.randn(d, d)
    return official


@pytest.fixture(scope="module")
def glip_t():
    torch.manual_seed(0)
    return build_model(get_preset("glip-t").replace(image_hw=(128, 128)))


def test_official_checkpoint_loads_every_shared_part(tmp_path, glip_t):
    official = _official_names_for(glip_t)
    torch.save({"model": official}, tmp_path / "glip_tiny_model_o365_goldg.pth")
    report = load_official(glip_t, str(tmp_path / "glip_tiny_model_o365_goldg.pth"))
    state = glip_t.state_dict()
    torch.testing.assert_close(state["backbone.layers.2.blocks.5.attn.qkv.weight"],
                               official["module.backbone.body.layers.2.blocks.5.attn.qkv.weight"])
    torch.testing.assert_close(state["head.fusion.3.attn.values_l_proj.weight"],
                               official["module.rpn.head.dyhead_tower.9.b_attn.attn.values_l_proj.weight"])
    q, k, v = (official[f"module.rpn.head.dyhead_tower.4.attention.self.{p}.weight"] for p in ("query", "key", "value"))
    torch.testing.assert_close(state["head.text_layers.1.self_attn.in_proj_weight"], torch.cat([q, k, v]))
    torch.testing.assert_close(state["head.bias0"], official["module.rpn.head.bias0"])
    # the deformable DyConv tower, the unused classification conv and BERT's pooler have no destination
    assert any("DyConv" in n for n in report.unused)
    assert any("cls_logits" in n for n in report.unused)
    assert any("pooler" in n for n in report.unused)
    # what stays initialised is the plain conv tower only
    assert report.not_loaded and all(n.startswith("head.tower.") for n in report.not_loaded)


# Official names written out by hand from microsoft/GLIP (not derived from this model's
# names or the converter's rules): swint.py under backbone.body, fpn.py (with
# LastLevelP6P7) under backbone.fpn, HF BERT under language_backbone.body.model, and
# vldyhead.py's VLDyHead: dyhead_tower.{3i} = VLFuse (b_attn: fuse_helper.py's
# BiAttentionBlockForCheckpoint), {3i+1} = BertEncoderLayer, {3i+2} = DyConv.
# (official name, shape in GLIP-T, where it lands in this model)
OFFICIAL_TO_OURS = [
    ("module.backbone.body.patch_embed.proj.weight", (96, 3, 4, 4), "backbone.patch_embed.proj.weight"),
    ("module.backbone.body.layers.2.blocks.5.attn.qkv.weight", (1152, 384), "backbone.layers.2.blocks.5.attn.qkv.weight"),
    ("module.backbone.body.norm3.bias", (768,), "backbone.norm3.bias"),
    ("module.backbone.fpn.fpn_inner2.weight", (256, 192, 1, 1), "fpn.fpn_inner2.weight"),
    ("module.backbone.fpn.fpn_layer4.bias", (256,), "fpn.fpn_layer4.bias"),
    ("module.backbone.fpn.top_blocks.p6.weight", (256, 256, 3, 3), "fpn.top_blocks.p6.weight"),
    ("module.backbone.fpn.top_blocks.p7.bias", (256,), "fpn.top_blocks.p7.bias"),
    ("module.language_backbone.body.model.embeddings.word_embeddings.weight", (30522, 768),
     "language.model.embeddings.word_embeddings.weight"),
    ("module.language_backbone.body.model.encoder.layer.11.output.LayerNorm.bias", (768,),
     "language.model.encoder.layer.11.output.LayerNorm.bias"),
    ("module.rpn.head.dyhead_tower.0.b_attn.gamma_v", (256,), "head.fusion.0.gamma_v"),
    ("module.rpn.head.dyhead_tower.3.b_attn.layer_norm_l.weight", (768,), "head.fusion.1.layer_norm_l.weight"),
    ("module.rpn.head.dyhead_tower.15.b_attn.attn.values_l_proj.weight", (2048, 768),
     "head.fusion.5.attn.values_l_proj.weight"),
    ("module.rpn.head.dyhead_tower.1.attention.output.dense.weight", (768, 768), "head.text_layers.0.self_attn.out_proj.weight"),
    ("module.rpn.head.dyhead_tower.4.attention.output.LayerNorm.bias", (768,), "head.text_layers.1.norm1.bias"),
    ("module.rpn.head.dyhead_tower.7.intermediate.dense.weight", (3072, 768), "head.text_layers.2.linear1.weight"),
    ("module.rpn.head.dyhead_tower.10.output.dense.bias", (768,), "head.text_layers.3.linear2.bias"),
    ("module.rpn.head.dyhead_tower.16.output.LayerNorm.weight", (768,), "head.text_layers.5.norm2.weight"),
    ("module.rpn.head.bbox_pred.weight", (4, 256, 1, 1), "head.bbox_pred.weight"),
    ("module.rpn.head.centerness.bias", (1,), "head.centerness.bias"),
    ("module.rpn.head.dot_product_projection_text.weight", (256, 768), "head.dot_product_projection_text.weight"),
    ("module.rpn.head.scales.4.scale", (1,), "head.scales.4.scale"),
    ("module.rpn.head.log_scale", (1,), "head.log_scale"),
    ("module.rpn.head.bias_lang", (768,), "head.bias_lang"),
    ("module.rpn.head.bias0", (1,), "head.bias0"),
]
# Official names with no destination here (DyConv's deformable conv, the classification
# conv, BERT's pooler).
OFFICIAL_UNUSED = [
    ("module.rpn.head.dyhead_tower.2.DyConv.1.conv.weight", (256, 256, 3, 3)),
    ("module.rpn.head.cls_logits.weight", (80, 256, 1, 1)),
    ("module.language_backbone.body.model.pooler.dense.weight", (768, 768)),
]


def test_hand_written_official_names_land_where_glip_keeps_them(tmp_path, glip_t):
    torch.manual_seed(1)
    official = {name: torch.randn(shape) for name, shape, _ in OFFICIAL_TO_OURS}
    official.update({name: torch.randn(shape) for name, shape in OFFICIAL_UNUSED})
    # BERT's separate query / key / value of text layer 2 become one in_proj, q then k then v.
    qkv = {p: (torch.randn(768, 768), torch.randn(768)) for p in ("query", "key", "value")}
    for p, (w, b) in qkv.items():
        official[f"module.rpn.head.dyhead_tower.7.attention.self.{p}.weight"] = w
        official[f"module.rpn.head.dyhead_tower.7.attention.self.{p}.bias"] = b
    torch.save({"model": official}, tmp_path / "glip_tiny.pth")
    report = load_official(glip_t, str(tmp_path / "glip_tiny.pth"))
    state = glip_t.state_dict()
    for name, _, ours in OFFICIAL_TO_OURS:
        assert torch.equal(state[ours], official[name]), f"{name} did not land in {ours}"
    assert torch.equal(state["head.text_layers.2.self_attn.in_proj_weight"], torch.cat([w for w, _ in qkv.values()]))
    assert torch.equal(state["head.text_layers.2.self_attn.in_proj_bias"], torch.cat([b for _, b in qkv.values()]))
    assert sorted(report.unused) == sorted(n.removeprefix("module.") for n, _ in OFFICIAL_UNUSED)
    assert {ours for _, _, ours in OFFICIAL_TO_OURS} | {"head.text_layers.2.self_attn.in_proj_weight",
                                                       "head.text_layers.2.self_attn.in_proj_bias"} == set(report.loaded)


def test_convert_keeps_names_it_does_not_know_as_unused():
    converted, unused = convert_official_state_dict({"module.roi_heads.mask.weight": torch.zeros(1)})
    assert converted == {} and unused == ["roi_heads.mask.weight"]


def test_non_glip_file_is_refused(tmp_path, glip_t):
    torch.save({"weights": 1}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="not an official GLIP checkpoint"):
        load_official(glip_t, str(tmp_path / "x.pth"))
