"""Tests of the exact cleanup passes: dce, fold-constants, fold-bn, eliminate-identity,
canonicalize.

Every test builds a graph (torch export or ``onnx.helper``), runs a pass, verifies the IR,
compares ONNX Runtime outputs before/after (max relative error <= 1e-5, ORT graph
optimizations disabled so ORT does not do the folding itself) and checks the structural
effect of the pass.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest

from nnsculpt import models
from onnx import TensorProto, helper, numpy_helper

from nnsculpt.ir import from_onnx, to_onnx_model, verify
from nnsculpt.passes import PassContext, get_pass, parse_pipeline
from nnsculpt.runtime.ort import make_inputs, session

EXACT_PASSES = ["dce", "fold-constants", "fold-bn", "eliminate-identity", "canonicalize"]
F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- helpers
def vi(name, shape, dt=F):
    return helper.make_tensor_value_info(name, dt, shape)


def make_model(nodes, inputs, outputs, inits=None, opset=17):
    inits = inits or {}
    graph = helper.make_graph(nodes, "test", inputs, outputs,
                              initializer=[numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def ort_run(model, feeds):
    sess = session(model, optimization_level="disable")
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()})))


def run_pass(name, g, ctx=None, **opts):
    ctx = ctx or PassContext()
    res = get_pass(name)(**opts)(g, ctx)
    verify(g)
    return res.changed, res


def check_same(ref_model, g, feeds=None, seeds=(0, 1)):
    """ORT outputs of ``g`` equal those of ``ref_model`` (max rel err <= 1e-5), same interface."""
    ref_g = from_onnx(ref_model)
    assert [o.name for o in g.outputs] == [o.name for o in ref_g.outputs]
    assert [i.name for i in g.inputs] == [i.name for i in ref_g.inputs]
    for o_new, o_ref in zip(g.outputs, ref_g.outputs):
        assert o_new.dtype == o_ref.dtype
        if o_ref.shape is not None and o_new.shape is not None:
            assert tuple(o_new.shape) == tuple(o_ref.shape), o_new.name
    new_model = to_onnx_model(g)
    feed_sets = [feeds] if feeds is not None else [make_inputs(ref_g, seed=s) for s in seeds]
    for f in feed_sets:
        a, b = ort_run(ref_model, f), ort_run(new_model, f)
        assert list(a) == list(b)
        for k in a:
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
            err = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max() if a[k].size else 0.0
            assert err <= 1e-5 * max(1.0, float(np.abs(a[k].astype(np.float64)).max())), (k, err)


def ops(g):
    return [n.op_type for n in g.nodes]


def torch_to_onnx(module, args, input_names, output_names, opset=17):
    """Export with the TorchScript exporter, keeping BatchNormalization nodes (eval mode +
    do_constant_folding=False keeps them; constant folding would fuse them away)."""
    torch = pytest.importorskip("torch")
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, f, dynamo=False, do_constant_folding=False,
                          opset_version=opset, input_names=input_names, output_names=output_names)
    return onnx.load_from_string(f.getvalue())


def randomize_bn(module):
    import torch

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.3, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
    return module


def bn_node(x, y, prefix, c, inits, eps=1e-5):
    inits[f"{prefix}_s"] = RNG.uniform(0.5, 1.5, c).astype(np.float32)
    inits[f"{prefix}_b"] = rand(c, scale=0.3)
    inits[f"{prefix}_m"] = rand(c, scale=0.5)
    inits[f"{prefix}_v"] = RNG.uniform(0.3, 2.0, c).astype(np.float32)
    return helper.make_node("BatchNormalization", [x, f"{prefix}_s", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [y], name=prefix, epsilon=eps)


# ----------------------------------------------------------------------- graph builders
def build_dce():
    inits = {"w": rand(4), "w_dead": rand(4), "unused_w": rand(3, 3)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "w"], ["y"], name="mul"),
        # dead branch: x -> Sigmoid -> Mul(w_dead) -> Exp, plus a dead Split with 2 outputs
        helper.make_node("Sigmoid", ["x"], ["s"], name="dead_sigmoid"),
        helper.make_node("Mul", ["s", "w_dead"], ["sm"], name="dead_mul"),
        helper.make_node("Exp", ["sm"], ["dead_out"], name="dead_exp"),
        helper.make_node("Split", ["r"], ["p0", "p1"], name="dead_split", axis=1, num_outputs=2),
        # Split with one used output stays
        helper.make_node("Split", ["x"], ["q0", "q1"], name="live_split", axis=1, num_outputs=2),
        helper.make_node("Neg", ["q1"], ["z"], name="neg"),
    ]
    return make_model(nodes, [vi("x", [2, 4]), vi("unused_in", [3])], [vi("y", [2, 4]), vi("z", [2, 2])],
                      inits, opset=18)


def build_fold_constants():
    """x[2,3,4]: a Constant->Add chain feeding Mul, Shape arithmetic feeding Reshape,
    Shape of a dynamic input, a RandomNormal (scale 0) and a constant graph output."""
    inits = {"c3": np.array([2.0], np.float32), "idx0": np.array(0, np.int64),
             "axes0": np.array([0], np.int64), "minus1": np.array([-1], np.int64),
             "ca": np.array([1.0, 2.0], np.float32), "cb": np.array([3.0, 4.0], np.float32)}
    nodes = [
        helper.make_node("Constant", [], ["k1"], name="k1", value=numpy_helper.from_array(rand(4), "k1")),
        helper.make_node("Constant", [], ["k2"], name="k2", value_float=0.5),
        helper.make_node("Add", ["k1", "k2"], ["k12"], name="add_consts"),
        helper.make_node("Mul", ["k12", "c3"], ["k123"], name="mul_consts"),
        helper.make_node("Add", ["x", "k123"], ["xa"], name="add_x"),
        # shape arithmetic on a static tensor
        helper.make_node("Shape", ["xa"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "idx0"], ["d0"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["d0", "axes0"], ["d0u"], name="unsq"),
        helper.make_node("Concat", ["d0u", "minus1"], ["newshape"], name="concat", axis=0),
        helper.make_node("Reshape", ["xa", "newshape"], ["y"], name="reshape"),
        # Shape of a dynamic input is not folded
        helper.make_node("Shape", ["d"], ["dshape"], name="dyn_shape"),
        helper.make_node("Cast", ["dshape"], ["dshape_f"], name="cast_shape", to=F),
        helper.make_node("Mul", ["d", "dshape_f"], ["z"], name="mul_d"),
        # random op: never folded (mean 1 + scale 1e-30 rounds to exactly 1 in float32)
        helper.make_node("RandomNormal", [], ["rn"], name="random", shape=[2], scale=1e-30, mean=1.0),
        helper.make_node("Add", ["z", "rn"], ["z2"], name="add_random"),
        # constant graph output: kept node-produced
        helper.make_node("Add", ["ca", "cb"], ["const_out"], name="const_out_add"),
    ]
    return make_model(nodes, [vi("x", [2, 3, 4]), vi("d", ["N", 2])],
                      [vi("y", [2, 12]), vi("z2", ["N", 2]), vi("const_out", [2])], inits)


def build_fold_bn():
    """Helper-built BN patterns: Gemm transB=0 with C (1,N), MatMul, Conv1d without bias and
    a weight shared by two convs, ConvTranspose (group 3, 1-D), BN as graph output, and
    non-foldable cases (BN on input, conv with two users, BN after Relu)."""
    inits = {}
    nodes = []
    # Gemm transB=0, C of shape (1, 6), alpha/beta != 1
    inits["gw"] = rand(5, 6)
    inits["gc"] = rand(1, 6)
    nodes.append(helper.make_node("Gemm", ["a", "gw", "gc"], ["g"], name="gemm0", alpha=0.7, beta=1.3))
    nodes.append(bn_node("g", "g_bn", "bn_gemm", 6, inits))
    nodes.append(helper.make_node("Relu", ["g_bn"], ["y_gemm"], name="relu_gemm"))
    # Gemm transB=1 without C
    inits["gw1"] = rand(6, 5)
    nodes.append(helper.make_node("Gemm", ["a", "gw1"], ["g1"], name="gemm1", transB=1))
    nodes.append(bn_node("g1", "y_gemm1", "bn_gemm1", 6, inits))  # BN output = graph output
    # MatMul with constant weight on a 2-D input
    inits["mw"] = rand(5, 3)
    nodes.append(helper.make_node("MatMul", ["a", "mw"], ["m"], name="matmul0"))
    nodes.append(bn_node("m", "y_mm", "bn_mm", 3, inits))
    # Conv1d without bias; weight shared with a second conv (must be copied, not mutated)
    inits["cw"] = rand(4, 2, 3)
    nodes.append(helper.make_node("Conv", ["t", "cw"], ["c1"], name="conv_a", kernel_shape=[3], pads=[1, 1]))
    nodes.append(bn_node("c1", "c1_bn", "bn_conv_a", 4, inits))
    nodes.append(helper.make_node("Conv", ["t", "cw"], ["c2"], name="conv_b", kernel_shape=[3], pads=[1, 1]))
    nodes.append(bn_node("c2", "c2_bn", "bn_conv_b", 4, inits))
    nodes.append(helper.make_node("Add", ["c1_bn", "c2_bn"], ["c12"], name="add_convs"))
    # grouped ConvTranspose 1-D: W (Cin=8, Cout/group=3, k=3), group=4 -> Cout=12
    inits["tw"] = rand(8, 3, 3)
    inits["tb"] = rand(12)
    nodes.append(helper.make_node("Concat", ["c12", "c12"], ["c12t"], name="cat", axis=1))
    nodes.append(helper.make_node("ConvTranspose", ["c12t", "tw", "tb"], ["ct"], name="convT", group=4,
                                  strides=[2], kernel_shape=[3]))
    nodes.append(bn_node("ct", "y_ct", "bn_convT", 12, inits))
    # not foldable: BN on a graph input, conv with two users, BN after Relu
    nodes.append(bn_node("t", "y_in", "bn_input", 2, inits))
    inits["dw"] = rand(4, 2, 1)
    nodes.append(helper.make_node("Conv", ["t", "dw"], ["d"], name="conv_two_users", kernel_shape=[1]))
    nodes.append(bn_node("d", "d_bn", "bn_two_users", 4, inits))
    nodes.append(helper.make_node("Relu", ["d"], ["d_relu"], name="relu_d"))
    nodes.append(bn_node("d_relu", "d_relu_bn", "bn_after_relu", 4, inits))
    nodes.append(helper.make_node("Add", ["d_bn", "d_relu_bn"], ["y_d"], name="add_d"))
    return make_model(nodes, [vi("a", ["N", 5]), vi("t", ["N", 2, 7])],
                      [vi("y_gemm", ["N", 6]), vi("y_gemm1", ["N", 6]), vi("y_mm", ["N", 3]),
                       vi("y_ct", ["N", 12, 15]), vi("y_in", ["N", 2, 7]), vi("y_d", ["N", 4, 7])], inits)


def build_eliminate_identity():
    inits = {
        "shape_same": np.array([2, 3, 4], np.int64), "shape_zero": np.array([0, 3, -1], np.int64),
        "shape_other": np.array([6, 4], np.int64), "pads0": np.zeros(6, np.int64),
        "st": np.array([0, -3], np.int64), "en": np.array([np.iinfo(np.int64).max, 4], np.int64),
        "ax": np.array([0, 1], np.int64), "exp_shape": np.array([3, 1], np.int64),
        "ones4": np.ones(4, np.float32), "zero1": np.zeros(1, np.float32),
        "ones_big": np.ones((5, 1, 1, 1), np.float32), "zeros234": np.zeros((2, 3, 4), np.float32),
        "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32),
    }
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["i1"], name="identity"),
        helper.make_node("Cast", ["i1"], ["c1"], name="cast_same", to=F),
        helper.make_node("Reshape", ["c1", "shape_same"], ["re1"], name="reshape_same"),
        helper.make_node("Reshape", ["re1", "shape_zero"], ["re2"], name="reshape_zero_minus1"),
        helper.make_node("Transpose", ["re2"], ["tr"], name="transpose_id", perm=[0, 1, 2]),
        helper.make_node("Pad", ["tr", "pads0"], ["pd"], name="pad_zero"),
        helper.make_node("Slice", ["pd", "st", "en", "ax"], ["sl"], name="slice_all"),
        helper.make_node("Concat", ["sl"], ["cc"], name="concat_one", axis=1),
        helper.make_node("Expand", ["cc", "exp_shape"], ["ex"], name="expand_same"),
        helper.make_node("Mul", ["ex", "ones4"], ["m1"], name="mul_one"),
        helper.make_node("Add", ["zero1", "m1"], ["a0"], name="add_zero_left"),
        helper.make_node("Add", ["a0", "zeros234"], ["a1"], name="add_zero_full"),
        helper.make_node("Div", ["a1", "one"], ["dv"], name="div_one"),
        helper.make_node("Dropout", ["dv"], ["dr"], name="dropout"),
        helper.make_node("Sigmoid", ["dr"], ["sg"], name="sigmoid"),
        helper.make_node("Identity", ["sg"], ["y"], name="identity_to_output"),
        # kept: shape-changing / dtype-changing / broadcasting / training / interface cases
        helper.make_node("Reshape", ["r", "shape_other"], ["z"], name="reshape_other"),
        helper.make_node("Cast", ["r"], ["w"], name="cast_f64", to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["r", "ones_big"], ["u"], name="mul_one_broadcast"),
        helper.make_node("Mul", ["r", "half"], ["h"], name="mul_half"),
        helper.make_node("Dropout", ["h"], ["v", "mask"], name="dropout_mask"),
        helper.make_node("Identity", ["x"], ["x_copy"], name="identity_input_to_output"),
    ]
    return make_model(nodes, [vi("x", [2, 3, 4])],
                      [vi("y", [2, 3, 4]), vi("z", [6, 4]), vi("w", [2, 3, 4], TensorProto.DOUBLE),
                       vi("u", [5, 2, 3, 4]), vi("v", [2, 3, 4]), vi("mask", [2, 3, 4], TensorProto.BOOL),
                       vi("x_copy", [2, 3, 4])], inits)


def build_canonicalize():
    inits = {"w1": rand(8, 16), "b1": rand(16), "w2": rand(16, 5), "b2": rand(1, 5),
             "w3": rand(8, 3), "b3": rand(3), "c": rand(5), "w4": rand(8, 4), "b4": rand(4)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["mm1"], name="mm1"),
        helper.make_node("Add", ["mm1", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["mm2"], name="mm2"),
        helper.make_node("Add", ["b2", "mm2"], ["h2"], name="add2"),  # bias on the left
        helper.make_node("Add", ["c", "h2"], ["h3"], name="add_const_left"),
        helper.make_node("Mul", ["c", "h3"], ["h4"], name="mul_const_left"),
        helper.make_node("Sub", ["h4", "c"], ["h5"], name="sub_x_c"),
        helper.make_node("Sub", ["c", "h5"], ["y"], name="sub_c_x"),
        # rank-3 input: stays MatMul + Add
        helper.make_node("MatMul", ["t", "w3"], ["mm3"], name="mm3"),
        helper.make_node("Add", ["mm3", "b3"], ["z"], name="add3"),
        # MatMul output with two users: stays
        helper.make_node("MatMul", ["x", "w4"], ["mm4"], name="mm4"),
        helper.make_node("Add", ["mm4", "b4"], ["u1"], name="add4"),
        helper.make_node("Mul", ["mm4", "u1"], ["u"], name="mul4"),
    ]
    return make_model(nodes, [vi("x", ["N", 8]), vi("t", [2, "T", 8])],
                      [vi("y", ["N", 5]), vi("z", [2, "T", 3]), vi("u", ["N", 4])], inits)


def build_fold_bn_torch():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_in = nn.BatchNorm2d(3)  # BN on the graph input: not foldable
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
            self.bn2 = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.bn3 = nn.BatchNorm2d(8)
            self.convT = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
            self.bn4 = nn.BatchNorm2d(6)
            self.bn_relu = nn.BatchNorm2d(6)  # after ReLU: not foldable
            self.fc = nn.Linear(6, 5)
            self.bn_fc = nn.BatchNorm1d(5)

        def forward(self, x):
            x = self.bn_in(x)
            x = torch.relu(self.bn1(self.conv(x)))
            x = self.bn2(self.gconv(x))
            x = torch.relu(self.bn3(self.dw(x)))
            x = self.bn_relu(torch.relu(self.bn4(self.convT(x))))
            x = x.mean(dim=(2, 3))
            return self.bn_fc(self.fc(x))

    torch.manual_seed(0)
    net = randomize_bn(Net())
    return torch_to_onnx(net, (torch.randn(2, 3, 8, 8),), ["x"], ["logits"])


def build_with_if():
    """An If whose branches read outer values ``cap`` (an Identity output), ``kk`` (a
    constant expression), ``r`` and ``bnc`` (a foldable Gemm+BN output); then a BN on the
    If output and an Identity to ``y``."""
    inits = {"c1": rand(3), "c2": rand(3), "zero": np.array(0.0, np.float32), "gw": rand(3, 3)}
    then_g = helper.make_graph(
        [helper.make_node("Add", ["cap", "kk"], ["t0"], name="then_add"),
         helper.make_node("Add", ["t0", "bnc"], ["t_out"], name="then_add2")], "then", [], [vi("t_out", [2, 3])])
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["r"], ["e0"], name="else_neg"),
         helper.make_node("Mul", ["e0", "cap"], ["e_out"], name="else_mul")], "else", [], [vi("e_out", [2, 3])])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["cap"], name="identity_captured"),
        helper.make_node("Add", ["c1", "c2"], ["kk"], name="const_captured"),
        helper.make_node("Gemm", ["x", "gw"], ["gm"], name="gemm_captured"),
        bn_node("gm", "bnc", "bn_captured", 3, inits),
        helper.make_node("ReduceSum", ["x"], ["sum"], name="sum", keepdims=0),
        helper.make_node("Greater", ["sum", "zero"], ["cond"], name="greater"),
        helper.make_node("If", ["cond"], ["if_out"], name="the_if", then_branch=then_g, else_branch=else_g),
        bn_node("if_out", "bn_out", "bn_after_if", 3, inits),
        helper.make_node("Identity", ["bn_out"], ["y"], name="identity_after_if"),
    ]
    return make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], inits)


BUILDERS = {
    "dce": build_dce,
    "fold-constants": build_fold_constants,
    "fold-bn": build_fold_bn,
    "eliminate-identity": build_eliminate_identity,
    "canonicalize": build_canonicalize,
}


# ------------------------------------------------------------------------------- tests
def test_registry_and_docs():
    for name in EXACT_PASSES:
        cls = get_pass(name)
        assert cls.name == name and cls.exact is True
        assert cls.summary() and cls.summary().endswith(".")
        doc = cls.__doc__ or ""
        assert "Precondition" in doc or "precondition" in doc.lower()
        cls()  # default options construct
    passes = parse_pipeline("fold-bn,dce{remove_unused_initializers=false},fold-constants{max_elements=100}")
    assert passes[2].options.max_elements == 100


def test_dce_removes_dead_branch_and_unused_initializers():
    m = build_dce()
    g = from_onnx(m)
    changed, ctx = run_pass("dce", g)
    assert changed
    names = {n.name for n in g.nodes}
    assert names == {"relu", "mul", "live_split", "neg"}
    assert "unused_w" not in g.initializers and "w_dead" not in g.initializers
    assert set(g.initializers) == {"w"}
    assert [i.name for i in g.inputs] == ["x", "unused_in"]  # inputs never removed
    assert ctx.notes
    check_same(m, g)


def test_dce_keep_initializers_option():
    g = from_onnx(build_dce())
    run_pass("dce", g, remove_unused_initializers=False)
    assert "unused_w" in g.initializers


def test_fold_constants():
    m = build_fold_constants()
    g = from_onnx(m)
    # a Constant node created by an earlier pass (from_onnx already turned the model's
    # Constant nodes into initializers)
    first = g.nodes[0]
    kc = g.add_node("Constant", [], 1, {"value": np.array([1.5, -2.0, 0.25, 3.0], np.float32)},
                    name="made_by_pass", before=first)
    add = g.node_by_name("add_x")
    scaled = g.add_node("Add", [add.inputs[1], kc.outputs[0]], 1, name="add_made", before=add)
    add.set_input(1, scaled.outputs[0])
    verify(g)
    ref = to_onnx_model(g)
    changed, ctx = run_pass("fold-constants", g)
    assert changed
    kinds = ops(g)
    # Constant -> Add -> Mul chain folded, Shape -> Gather -> Unsqueeze -> Concat folded
    for gone in ("Constant", "Gather", "Unsqueeze", "Concat"):
        assert gone not in kinds, kinds
    assert {n.name for n in g.nodes if n.op_type == "Shape"} == {"dyn_shape"}  # dynamic: kept
    assert "random" in {n.name for n in g.nodes}  # random op never folded
    assert "const_out_add" in {n.name for n in g.nodes}  # graph output stays node-produced
    reshape = g.node_by_name("reshape")
    assert reshape.inputs[1].is_const and reshape.inputs[1].name == "newshape"  # named after the value
    assert reshape.inputs[1].const.tolist() == [2, -1]
    assert g.node_by_name("add_x").inputs[1].is_const
    # initializers only feeding folded nodes are gone
    assert "c3" not in g.initializers and "idx0" not in g.initializers
    notes = " ".join(ctx.notes)
    assert "random" in notes and "graph output" in notes
    check_same(ref, g)


def test_fold_constants_max_elements():
    inits = {"small": rand(4), "reps": np.array([64], np.int64)}
    nodes = [helper.make_node("Tile", ["small", "reps"], ["big"], name="tile"),
             helper.make_node("Add", ["x", "big"], ["y"], name="add")]
    m = make_model(nodes, [vi("x", [256])], [vi("y", [256])], inits)
    g = from_onnx(m)
    changed, ctx = run_pass("fold-constants", g, max_elements=100)
    assert not changed and "Tile" in ops(g)
    assert any("max_elements" in s for s in ctx.notes)
    changed, _ = run_pass("fold-constants", g)
    assert changed and "Tile" not in ops(g)
    check_same(m, g)


def test_fold_constants_keeps_weight_decompression():
    w8 = RNG.integers(-100, 100, size=(64, 32), dtype=np.int8)
    inits = {"w8": w8, "sc": np.array(0.02, np.float32), "zp": np.array(0, np.int8)}
    nodes = [helper.make_node("DequantizeLinear", ["w8", "sc", "zp"], ["w"], name="dq"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    m = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 32])], inits)
    g = from_onnx(m)
    changed, _ = run_pass("fold-constants", g)
    assert not changed and "DequantizeLinear" in ops(g)
    changed, _ = run_pass("fold-constants", g, keep_weight_decompression=False)
    assert changed and "DequantizeLinear" not in ops(g)
    check_same(m, g)


def test_fold_bn_helper_graph():
    m = build_fold_bn()
    g = from_onnx(m)
    cw_before = g.initializers["cw"].const.copy()
    changed, ctx = run_pass("fold-bn", g)
    assert changed
    left = sorted(n.name for n in g.nodes if n.op_type == "BatchNormalization")
    assert left == ["bn_after_relu", "bn_input", "bn_two_users"]
    # folded nodes keep their names and provenance and are stamped
    for name in ("gemm0", "gemm1", "matmul0", "conv_a", "conv_b", "convT"):
        n = g.node_by_name(name)
        assert n.meta.get("pass") == "fold-bn" and n.meta.get("source") == name
        assert n.meta["folded"]
    assert g.node_by_name("matmul0").op_type == "Gemm"
    assert g.node_by_name("gemm0").attrs["beta"] == 1.0
    # the shared weight was copied for the first conv (the second, then its only reader,
    # may update it in place): each conv has its own folded weight
    a, b = g.node_by_name("conv_a").inputs[1], g.node_by_name("conv_b").inputs[1]
    assert a is not b and not np.array_equal(a.const, cw_before) and not np.array_equal(b.const, cw_before)
    # BN output that is a graph output keeps its name and is now written by the Gemm
    assert g.values["y_gemm1"].producer.name == "gemm1"
    notes = " ".join(ctx.notes)
    assert "bn_two_users" in notes
    check_same(m, g)
    # then dce cleans the now-unused BN parameters
    run_pass("dce", g)
    assert not any(k.startswith("bn_gemm_") for k in g.initializers)
    check_same(m, g)


def test_fold_bn_torch_export():
    m = build_fold_bn_torch()
    g = from_onnx(m)
    n_bn = ops(g).count("BatchNormalization")
    assert n_bn == 7
    changed, _ = run_pass("fold-bn", g)
    assert changed
    left = [n for n in g.nodes if n.op_type == "BatchNormalization"]
    assert len(left) == 2  # BN on the input, BN after ReLU
    for n in left:
        p = n.inputs[0].producer
        assert p is None or p.op_type not in ("Conv", "ConvTranspose", "Gemm")
    for n in g.nodes:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm"):
            assert not any(u.op_type == "BatchNormalization" for u in n.outputs[0].users)
    assert [o.name for o in g.outputs] == ["logits"]
    check_same(m, g)
    run_pass("dce", g)
    check_same(m, g)


def test_eliminate_identity():
    m = build_eliminate_identity()
    g = from_onnx(m)
    changed, ctx = run_pass("eliminate-identity", g)
    assert changed
    names = {n.name for n in g.nodes}
    assert names == {"relu", "sigmoid", "reshape_other", "cast_f64", "mul_one_broadcast", "mul_half",
                     "dropout_mask", "identity_input_to_output"}, names
    # the Identity feeding output 'y' is gone, the output keeps its name
    assert [o.name for o in g.outputs] == ["y", "z", "w", "u", "v", "mask", "x_copy"]
    assert g.values["y"].producer.op_type == "Sigmoid"
    assert "pads0" not in g.initializers and "ones4" not in g.initializers
    check_same(m, g)


def test_eliminate_identity_torch_flatten_dropout():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    net = nn.Sequential(nn.Linear(6, 4), nn.Identity(), nn.Dropout(0.5), nn.Flatten(), nn.ReLU())
    m = torch_to_onnx(net, (torch.randn(3, 6),), ["x"], ["y"])
    g = from_onnx(m)
    run_pass("eliminate-identity", g)
    assert "Flatten" not in ops(g) and "Identity" not in ops(g) and "Dropout" not in ops(g)
    check_same(m, g)


def test_canonicalize():
    m = build_canonicalize()
    g = from_onnx(m)
    g.add_node("Constant", [], ["kconst"], {"value": np.float32(2.0) * np.ones(5, np.float32)}, name="kc")
    y_sub = g.node_by_name("sub_c_x")
    kmul = g.add_node("Mul", [y_sub.inputs[1], g.values["kconst"]], 1, name="mul_k", before=y_sub)
    y_sub.set_input(1, kmul.outputs[0])
    g.topological_sort()
    verify(g)
    ref = to_onnx_model(g)
    g.nodes.reverse()  # scramble the order; canonicalize must sort it back
    changed, ctx = run_pass("canonicalize", g)
    assert changed
    kinds = ops(g)
    assert "Constant" not in kinds and g.values["kconst"].is_const
    gemms = {n.name: n for n in g.nodes if n.op_type == "Gemm"}
    assert set(gemms) == {"mm1", "mm2"}
    for n in gemms.values():
        assert n.attrs.get("transB", 0) == 0 and n.meta["pass"] == "canonicalize"
    assert g.values["h2"].producer is gemms["mm2"]
    assert g.node_by_name("mm3").op_type == "MatMul"  # rank 3: kept
    assert g.node_by_name("mm4").op_type == "MatMul"  # two users: kept
    for name in ("add_const_left", "mul_const_left"):
        n = g.node_by_name(name)
        assert not n.inputs[0].is_const and n.inputs[1].is_const
    assert g.node_by_name("sub_x_c").inputs[1].is_const and g.node_by_name("sub_c_x").inputs[0].is_const
    assert any("rank" in s for s in ctx.notes)
    check_same(ref, g)


@pytest.mark.parametrize("name", EXACT_PASSES)
def test_idempotent(name):
    m = BUILDERS[name]()
    g = from_onnx(m)
    first, _ = run_pass(name, g)
    assert first
    second, ctx = run_pass(name, g)
    assert second is False, ctx.notes
    check_same(m, g)


def test_full_pipeline_on_all_builders():
    for name, build in BUILDERS.items():
        m = build()
        g = from_onnx(m)
        ctx = PassContext()
        for p in parse_pipeline("canonicalize,fold-bn,fold-constants,eliminate-identity,dce"):
            p(g, ctx)
            verify(g)
        check_same(m, g)
        for p in parse_pipeline("canonicalize,fold-bn,fold-constants,eliminate-identity,dce"):
            assert p(g, ctx).changed is False, (name, p.name)


def _if_signature(g):
    n = next(n for n in g.nodes if n.op_type == "If")
    return (n.name, tuple(v.name for v in n.inputs), sorted(v.name for v in n.implicit_inputs),
            {k: v.SerializeToString() for k, v in n.attrs.items() if isinstance(v, onnx.GraphProto)})


@pytest.mark.parametrize("name", EXACT_PASSES + ["all"])
def test_if_node_untouched(name):
    m = build_with_if()
    g = from_onnx(m)
    sig = _if_signature(g)
    assert set(sig[2]) == {"cap", "kk", "r", "bnc"}
    ctx = PassContext()
    names = EXACT_PASSES if name == "all" else [name]
    notes = {}
    for n in names:
        notes[n] = get_pass(n)()(g, ctx).notes
        verify(g)
    assert _if_signature(g) == sig
    assert "cap" in g.values and g.values["cap"].producer.op_type == "Identity"
    if name in ("fold-bn", "all"):
        assert g.values["bnc"].producer.op_type == "Gemm"  # folded, captured name kept
        assert [n.name for n in g.nodes if n.op_type == "BatchNormalization"] == ["bn_after_if"]
        assert any("If" in s for s in notes["fold-bn"])
    if name in ("eliminate-identity", "all"):
        assert any("captured by a subgraph" in s for s in notes["eliminate-identity"])
        assert "identity_after_if" not in {n.name for n in g.nodes}
    for sign in (1.0, -1.0):  # both branches
        x = (np.abs(rand(2, 3)) + 0.1) * sign
        check_same(m, g, feeds={"x": x.astype(np.float32)})


def test_unknown_domain_untouched():
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id"),
             helper.make_node("MyOp", ["a"], ["b"], name="custom", domain="com.example"),
             helper.make_node("MyOp", ["x"], ["dead"], name="custom_dead", domain="com.example"),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "t", [vi("x", [2])], [vi("y", [2])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    g = from_onnx(m)
    run_pass("dce", g, keep_custom_domains=True)
    assert "custom_dead" in {n.name for n in g.nodes}
    for n in EXACT_PASSES:
        run_pass(n, g)
    assert "custom" in {n.name for n in g.nodes}
    assert "custom_dead" not in {n.name for n in g.nodes}


# ------------------------------------------------------------------------------- zoo
@pytest.mark.parametrize("name", models.list_models())
def test_zoo_fold_bn_dce(name):
    """fold-bn,dce on every zoo model converted with nnsculpt.ir.from_torch."""
    from nnsculpt import ir

    model, xs = models.get_model(name), tuple(models.example_inputs(name))
    g = ir.from_torch(model, xs)
    ref = to_onnx_model(g)
    feeds = {v.name: x.numpy() for v, x in zip(g.inputs, xs)}
    a = ort_run(ref, feeds)
    ctx = PassContext()
    for p in parse_pipeline("fold-bn,dce"):
        p(g, ctx)
        verify(g)
    for n in g.nodes:  # every BN right after a single-use Conv/ConvTranspose/Gemm is gone
        if n.op_type == "BatchNormalization":
            x = n.inputs[0]
            assert not (x.producer is not None and x.producer.op_type in ("Conv", "ConvTranspose", "Gemm")
                        and len(x.uses) == 1), n.name
    assert [o.name for o in g.outputs] == [o.name for o in ref.graph.output]
    b = ort_run(to_onnx_model(g), feeds)
    for k in a:
        err = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()
        assert err <= 1e-5 * max(1.0, float(np.abs(a[k].astype(np.float64)).max())), (k, err)
    for p in parse_pipeline("fold-bn,dce"):  # idempotent on real models too
        assert p(g, ctx).changed is False
