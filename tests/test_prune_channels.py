"""prune-channels: the channel-dependency analysis, importance criteria, targets, schedules,
physical removal, the CLI / Python API, every zoo model and real third-party ONNX models."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from nnsculpt import models
from nnsculpt.ir import from_onnx, from_torch, graph_stats, verify
from nnsculpt.ir.channel_deps import CHANNEL_RULES, channel_dependencies
from nnsculpt.ir.errors import PassOptionError
from nnsculpt.passes import PassContext, get_pass, parse_pipeline
from nnsculpt.passes.prune.rewrite import UPDATE_RULES, apply_channel_removal, zero_channels
from nnsculpt.ir.errors import MissingCalibrationDataError
from nnsculpt.runtime import make_inputs, run, to_onnx
from nnsculpt.prune import prune_module

from .conftest import max_rel_err
from .thirdparty import make_inputs as tp_inputs
from .thirdparty import require

_GRAPHS: dict[str, object] = {}


def zoo_graph(name: str):
    """A fresh copy of a zoo model's graph (conversion cached per session)."""
    if name not in _GRAPHS:
        _GRAPHS[name] = from_torch(models.get_model(name), models.example_inputs(name),
                                   input_names=list(models.input_names(name)),
                                   output_names=list(models.output_names(name)))
    return _GRAPHS[name].copy()


def prune(g, ctx=None, **opts):
    p = get_pass("prune-channels")(**opts)
    ctx = ctx or PassContext()
    res = p(g, ctx)
    verify(g)
    return res.changed, res


def max_rel(a: dict, b: dict) -> float:
    return max(max_rel_err(a[k], b[k]) for k in a)


def conv_widths(g) -> dict[str, int]:
    return {n.name: int(n.inputs[1].const.shape[0]) for n in g.nodes if n.op_type == "Conv"}


# --------------------------------------------------------------------------- small models
class Mixed(torch.nn.Module):
    """InstanceNorm, a grouped (non-depthwise) conv, ConvTranspose, a channel Slice and a
    Flatten (C*H*W) into a Linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.inorm = torch.nn.InstanceNorm2d(16, affine=True)
        self.gconv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn = torch.nn.BatchNorm2d(16)
        self.up = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.conv2 = torch.nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(6 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.inorm(self.conv1(x)))
        y = torch.relu(self.bn(self.gconv(y)))
        y = torch.relu(self.up(y))
        y = torch.relu(self.conv2(y))
        y = y[:, 2:8]
        return self.fc(torch.flatten(y, 1))


@pytest.fixture(scope="module")
def mixed_graph(tmp_path_factory):
    torch.manual_seed(0)
    m = Mixed().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.inorm.weight.uniform_(0.5, 1.5)
        m.inorm.bias.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("mixed") / "mixed.onnx"
    torch.onnx.export(m, (torch.randn(1, 3, 8, 8),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=13, dynamo=False,
                      do_constant_folding=False)
    return from_onnx(path)


def _onnx_chain_with_unknown_op():
    """Conv -> Relu -> Conv -> LRN (not in the rule table) -> Conv -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in [
        ("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
        ("w2", rng.standard_normal((8, 8, 3, 3)).astype(np.float32)),
        ("w3", rng.standard_normal((8, 8, 3, 3)).astype(np.float32)),
        ("fw", rng.standard_normal((4, 8)).astype(np.float32)),
    ]]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("LRN", ["c2"], ["l2"], name="lrn", size=3),
        helper.make_node("Conv", ["l2", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


# ============================================================================== analysis
def test_rule_table_covers_required_ops():
    need = ["Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "LayerNormalization",
            "InstanceNormalization", "Add", "Mul", "Sub", "Div", "Concat", "Split", "Slice", "Flatten",
            "Reshape", "Transpose", "MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "Clip",
            "Sigmoid", "HardSwish", "Softmax", "Resize", "Gather"]
    missing = [op for op in need if op not in CHANNEL_RULES]
    assert not missing
    assert all(r.doc for r in CHANNEL_RULES.values())
    # every op whose attributes / shape constants the rewriter updates has a coupling rule
    assert set(UPDATE_RULES) <= set(CHANNEL_RULES)


def test_unknown_op_stops_the_analysis():
    g = _onnx_chain_with_unknown_op()
    deps = channel_dependencies(g)
    by_layer = {layer: grp for grp in deps.groups for layer in grp.layers}
    assert by_layer["conv1"].prunable
    assert not by_layer["conv2"].prunable and "LRN" in by_layer["conv2"].reason
    assert by_layer["conv3"].prunable
    assert not by_layer["fc"].prunable and "graph output" in by_layer["fc"].reason
    x = make_inputs(g, batch=2)
    prune(g, ratio=0.5)
    w = conv_widths(g)
    assert w == {"conv1": 4, "conv2": 8, "conv3": 4}
    assert run(g, x)["y"].shape == (2, 4)


def test_resnet_residual_group_and_depthwise_group():
    deps = channel_dependencies(zoo_graph("resnet20"))
    res = [g for g in deps.groups if "layer1.0.conv2" in g.layers][0]
    # the stem, every block's second conv of stage 1 and their BNs are one group of 16 units
    assert res.prunable and res.n_units == 16
    assert {"conv1", "bn1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"} <= set(res.layers)
    assert {"layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0"} <= set(res.consumers)

    g = zoo_graph("mobilenetv2")
    deps = channel_dependencies(g)
    dw = [n for n in g.nodes if n.op_type == "Conv" and n.attrs.get("group", 1) > 1][0]
    expand = dw.inputs[0].producer.inputs[0].producer.inputs[0].producer  # Clip <- BN <- Conv
    grp = [gr for gr in deps.groups if dw.name in gr.layers][0]
    assert expand.name in grp.layers  # depthwise in/out channels coupled with the expansion conv
    groups0 = int(dw.attrs["group"])
    prune(g, ratio=0.5)
    dw2 = g.node_by_name(dw.name)
    assert dw2.attrs["group"] == dw2.inputs[1].const.shape[0] == groups0 // 2


def test_concat_split_and_heads_structure():
    g = zoo_graph("c2f")
    deps = channel_dependencies(g)
    # C2f: the two halves of cv1 are separate groups (Split ranges); the second half is coupled
    # with the bottleneck's residual and both land at their offsets in the Concat
    halves = [grp for grp in deps.groups if "model.2.cv1.conv" in grp.layers]
    assert len(halves) == 2 and sorted(h.n_units for h in halves) == [16, 16]
    assert any("model.2.m.0.cv2.conv" in h.layers for h in halves)
    x = make_inputs(g, batch=2)
    ref_shape = run(g, x)["logits"].shape
    prune(g, ratio=0.5)
    split = [n for n in g.nodes if n.op_type == "Split"][0]
    assert list(split.inputs[1].const) == [8, 8]
    assert run(g, x)["logits"].shape == ref_shape

    g = zoo_graph("vit_tiny")
    deps = channel_dependencies(g)
    heads = [grp for grp in deps.groups if "blocks.0.attn.q" in grp.layers][0]
    assert heads.n_units == 4  # whole heads
    assert {"blocks.0.attn.k", "blocks.0.attn.v"} <= set(heads.layers)
    x = make_inputs(g, batch=2)
    prune(g, ratio=0.5)
    split_heads = [n for n in g.nodes if n.op_type == "Reshape" and len(n.outputs[0].shape or ()) == 4]
    assert split_heads and all(int(n.inputs[1].const[2]) == 2 and int(n.inputs[1].const[3]) == 16 for n in split_heads)
    assert run(g, x)["logits"].shape == (2, 10)


def test_mixed_ops_groups_and_exact_removal_of_zeroed_channels(mixed_graph):
    g = mixed_graph.copy()
    deps = channel_dependencies(g)
    ops = {n.op_type for n in g.nodes}
    assert {"InstanceNormalization", "ConvTranspose", "Slice", "Flatten", "Gemm"} <= ops
    names = {n.op_type: n.name for n in g.nodes}
    gconv = [n for n in g.nodes if n.op_type == "Conv" and n.attrs.get("group", 1) == 4][0]
    grp = [gr for gr in deps.groups if gconv.name in gr.layers and gr.prunable][0]
    assert grp.n_units == 4  # whole groups of the grouped conv, coupled with conv1's channels
    # conv2 -> Slice(2:8) -> Flatten -> Gemm: the 6 sliced channels are units of 64 features
    fc = names["Gemm"]
    sliced = [gr for gr in deps.groups if fc in gr.consumers][0]
    assert sliced.prunable and sliced.n_units == 6

    x = make_inputs(g, batch=3)
    rng = np.random.default_rng(1)
    removal = {gr.index: sorted(rng.choice(gr.n_units, gr.n_units // 2, replace=False).tolist())
               for gr in deps.groups if gr.prunable}
    zero_channels(g, deps, removal)
    ref = run(g, x)
    before = graph_stats(g)
    prune(g, ratio=0.5)  # l2: the zeroed units score 0 and go first
    after = graph_stats(g)
    assert max_rel(ref, run(g, x)) < 1e-5
    assert after.params < before.params and after.flops < before.flops
    assert g.node_by_name(gconv.name).attrs["group"] == 2


@pytest.mark.parametrize("name", ["vit_tiny", "bert_tiny"])
def test_transformer_heads_and_mlp_removal_is_exact(name):
    """Zeroed heads / MLP units are removed exactly; the residual stream is marked lossy (LayerNorm)."""
    g = zoo_graph(name)
    x = make_inputs(g, batch=2)
    deps = channel_dependencies(g)
    assert any(gr.lossy for gr in deps.prunable_groups())
    rng = np.random.default_rng(0)
    removal = {gr.index: sorted(rng.choice(gr.n_units, gr.n_units // 2, replace=False).tolist())
               for gr in deps.prunable_groups() if not gr.lossy}
    zero_channels(g, deps, removal)
    ref = run(g, x)
    apply_channel_removal(g, deps, removal)
    verify(g)
    assert max_rel(ref, run(g, x)) < 1e-5


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "densenet_block", "c2f", "se_net"])
def test_removing_zeroed_channels_is_exact(name):
    g = zoo_graph(name)
    x = make_inputs(g, batch=2)
    deps = channel_dependencies(g)
    rng = np.random.default_rng(0)
    removal = {gr.index: sorted(rng.choice(gr.n_units, gr.n_units // 2, replace=False).tolist())
               for gr in deps.groups if gr.prunable}
    zero_channels(g, deps, removal)
    ref = run(g, x)
    b0 = len(to_onnx(g).SerializeToString())
    prune(g, ratio=0.5, importance="l1")
    assert max_rel(ref, run(g, x)) < 1e-5
    assert len(to_onnx(g).SerializeToString()) < 0.5 * b0


# ============================================================================ zoo models
@pytest.mark.parametrize("name", models.list_models())
def test_every_zoo_model(name):
    g = zoo_graph(name)
    x = make_inputs(g, batch=2)
    ref = run(g, x)
    deps = channel_dependencies(g)
    pg = deps.prunable_groups()
    assert pg, f"{name}: nothing prunable"
    before = graph_stats(g)
    _, ctx = prune(g, ratio=0.5)
    out = run(g, x)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    assert [o.name for o in g.outputs] == list(models.output_names(name))
    after = graph_stats(g)
    assert after.params < 0.6 * before.params and after.flops < 0.6 * before.flops
    assert after.model_bytes < 0.6 * before.model_bytes  # the ONNX file shrinks
    # every prunable group lost half of its units
    after_units = {gr.layers: gr.n_units for gr in channel_dependencies(g).groups}
    assert all(after_units[gr.layers] == gr.n_units - gr.n_units // 2 for gr in pg)


# ========================================================================= targets, options
def test_targets_global_caps_protect_round_to():
    base = zoo_graph("resnet20")
    st0 = graph_stats(base)
    for target, key in (("flops:0.5", "flops"), ("params:0.4", "params")):
        for glob in (False, True):
            g = base.copy()
            prune(g, target=target, **{"global": glob})
            frac = float(target.split(":")[1])
            got = getattr(graph_stats(g), key) / getattr(st0, key)
            assert frac - 0.08 < got <= frac + 0.01, (target, glob, got)

    g = base.copy()
    deps0 = {tuple(gr.layers): gr.n_units for gr in channel_dependencies(g).prunable_groups()}
    prune(g, ratio=0.5, max_ratio=0.25, **{"global": True})
    for gr in channel_dependencies(g).prunable_groups():
        assert gr.n_units >= deps0[tuple(gr.layers)] * 0.75

    g = base.copy()
    prune(g, ratio=0.5, protect=["layer2.0.conv1"])
    assert conv_widths(g)["layer2.0.conv1"] == 32 and conv_widths(g)["layer3.0.conv1"] == 32

    g = base.copy()
    prune(g, ratio=0.3, round_to=8)
    assert all(w % 8 == 0 for w in conv_widths(g).values())

    with pytest.raises(PassOptionError, match="protect"):
        prune(base.copy(), ratio=0.5, protect=["no_such_layer"])
    for bad in ("ratio=1.5", "target=latency:0.5", "round_to=0", "steps=0"):
        with pytest.raises(PassOptionError):
            parse_pipeline("prune-channels{" + bad + "}")
    p = parse_pipeline("prune-channels{ratio=0.3,global=true,protect=[fc,conv1],target=flops:0.5}")[0]
    assert p.options_dict()["global"] is True and p.options.protect == ["fc", "conv1"]
    assert "global=true" in p.describe()


def test_importance_criteria_pick_the_weak_channels():
    g = zoo_graph("resnet20")
    conv = g.node_by_name("layer2.1.conv1")
    w = conv.inputs[1].const.copy()
    weak = np.arange(0, 32, 2)
    w[weak] *= 1e-3
    conv.inputs[1].set_const(w)
    bn = g.node_by_name("layer2.1.bn1")
    gamma = bn.inputs[1].const.copy()
    gamma[weak] *= 1e-3
    bn.inputs[1].set_const(gamma)
    for crit in ("l1", "l2", "bn_gamma"):
        h = g.copy()
        prune(h, ratio=0.5, importance=crit)
        left = np.abs(h.node_by_name("layer2.1.conv1").inputs[1].const).reshape(16, -1).sum(1)
        assert left.min() > np.abs(w[weak]).reshape(16, -1).sum(1).max(), crit

    calib = {"input": make_inputs(g, batch=8, seed=3)["input"]}
    for crit in ("taylor", "activation", "apoz", "random"):
        h = g.copy()
        with pytest.raises(MissingCalibrationDataError) if crit != "random" else contextlib.nullcontext():
            prune(h, ratio=0.5, importance=crit)
        h = g.copy()
        _, ctx = prune(h, PassContext(calib_data=calib), ratio=0.5, importance=crit)
        assert graph_stats(h).params < graph_stats(g).params
        if crit == "taylor":
            assert any("BatchNormalization" in n for n in ctx.notes)


# ============================================================================== schedules
def test_iterative_and_soft_schedules_call_the_finetune_callback():
    base = zoo_graph("resnet20")
    calls = []

    def finetune(graph, step):
        calls.append((step, graph_stats(graph).params))

    g = base.copy()
    prune(g, PassContext(finetune=finetune), ratio=0.5, steps=3)
    assert [c[0] for c in calls] == [1, 2, 3]
    assert calls[0][1] > calls[1][1] > calls[2][1]
    one = base.copy()
    prune(one, ratio=0.5)
    assert sorted(conv_widths(one).values()) == sorted(conv_widths(g).values())

    calls.clear()
    zeros = []

    def soft_ft(graph, step):
        calls.append(step)
        w = graph.node_by_name("layer1.0.conv1").inputs[1].const
        zeros.append(int((np.abs(w).reshape(w.shape[0], -1).sum(1) == 0).sum()))
        # "training" moves the zeroed filters a little: soft pruning lets them come back
        graph.node_by_name("layer1.0.conv1").inputs[1].set_const(w + 1e-4)

    g = base.copy()
    prune(g, PassContext(finetune=soft_ft), ratio=0.5, soft=True, steps=2)
    assert calls == [1, 2] and zeros == [8, 8]
    assert conv_widths(g)["layer1.0.conv1"] == 8


# ======================================================================== API and the CLI
def test_prune_module_returns_a_smaller_trainable_module():
    model = models.get_model("digits_resnet", pretrained=True)
    x = models.example_inputs("digits_resnet", batch=4)[0]
    steps = []

    def finetune(m, step):
        steps.append(step)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        m.train()
        loss = m(x).logsumexp(1).mean()
        loss.backward()
        opt.step()

    small = prune_module(model, x, ratio=0.5, steps=2, finetune=finetune, round_to=4)
    assert steps == [1, 2]
    assert sum(p.numel() for p in small.parameters()) < 0.4 * sum(p.numel() for p in model.parameters())
    convs = {n: m for n, m in small.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs["layer1.0.conv1"].out_channels == 8 and convs["layer2.0.conv1"].out_channels == 16
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    assert small.prune_report["after"]["flops"] < small.prune_report["before"]["flops"]


def test_cli_compile(tmp_path):
    from nnsculpt.models.data import digits_npz
    from nnsculpt.cli import main

    out = tmp_path / "p.onnx"
    assert main(["compile", "zoo:digits_resnet", "-p", "prune-channels{ratio=0.5}", "-o", str(out)]) == 0
    m = onnx.load(str(out))
    assert [o.name for o in m.graph.output] == ["logits"]
    assert out.stat().st_size < 0.4 * len(to_onnx(zoo_graph("digits_resnet")).SerializeToString())
    bad = tmp_path / "bad.onnx"
    assert main(["compile", "zoo:digits_resnet", "-p", "prune-channels{importance=taylor}", "-o", str(bad)]) == 2
    assert not bad.exists()
    calib = digits_npz(tmp_path / "calib.npz", split="train", n=64)
    assert main(["compile", "zoo:digits_resnet", "-p", "prune-channels{ratio=0.5,importance=taylor}",
                 "-o", str(bad), "--calib-data", str(calib), "--verify"]) == 0
    assert bad.exists()


# ===================================================================== third-party models
@pytest.mark.thirdparty
@pytest.mark.parametrize("key", ["nudenet_yolov8n", "pplcnet_orientation", "ppocr_cls_v2", "picodet_layout_cdla"])
def test_thirdparty_models(key):
    g = from_onnx(require(key))
    feeds = tp_inputs(key)
    ref = run(g, feeds)
    deps = channel_dependencies(g)
    assert len(deps.prunable_groups()) >= 10
    st0 = graph_stats(g)
    rng = np.random.default_rng(0)
    removal = {gr.index: sorted(rng.choice(gr.n_units, gr.n_units // 2, replace=False).tolist())
               for gr in deps.prunable_groups()}
    zero_channels(g, deps, removal)
    zref = run(g, feeds)
    prune(g, ratio=0.5)
    out = run(g, feeds)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    assert graph_stats(g).params < 0.45 * st0.params
    assert max_rel(zref, out) < 1e-4  # the zeroed channels were the ones removed: exact
