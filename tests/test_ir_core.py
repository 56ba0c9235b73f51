"""IR core: use-def chains, mutation API, verifier, ONNX import/export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnsculpt.ir import Graph, from_onnx, to_onnx_model, verify
from nnsculpt.ir.errors import IRError, ModelLoadError, VerificationError
from nnsculpt.runtime import run, session

from .conftest import max_rel_err


def _tiny() -> Graph:
    g = Graph("tiny")
    x = g.add_input("x", np.float32, ("N", 4))
    w = g.add_initializer("w", np.arange(12, dtype=np.float32).reshape(4, 3))
    mm = g.add_node("MatMul", [x, w], name="mm")
    r = g.add_node("Relu", [mm.outputs[0]], ["y"], name="relu")
    g.outputs.append(r.outputs[0])
    return g


def test_use_def_and_replace():
    g = _tiny()
    x, mm, relu = g.inputs[0], g.node_by_name("mm"), g.node_by_name("relu")
    assert mm.outputs[0].users == [relu] and mm.outputs[0].producer is mm
    assert (mm, 0) in x.uses
    ident = g.add_node("Identity", [mm.outputs[0]], name="id", after=mm)
    g.replace_all_uses_with(mm.outputs[0], ident.outputs[0])
    # replace also rewired the identity itself -> fix it back
    ident.set_input(0, mm.outputs[0])
    verify(g)
    assert relu.inputs[0] is ident.outputs[0]
    with pytest.raises(IRError, match="still used"):
        g.remove_node(mm)


def test_replace_graph_output_keeps_public_name():
    g = _tiny()
    relu = g.node_by_name("relu")
    sig = g.add_node("Sigmoid", [relu.inputs[0]], name="sig")
    g.replace_all_uses_with(relu.outputs[0], sig.outputs[0])
    g.remove_node(relu)
    verify(g)
    assert [o.name for o in g.outputs] == ["y"] and g.outputs[0].producer is sig


def test_verifier_catches_broken_graphs():
    g = _tiny()
    g.nodes.reverse()  # relu before matmul: use before def
    with pytest.raises(VerificationError, match="defined later"):
        verify(g)
    g = _tiny()
    w = g.initializers["w"]
    w.set_const(np.zeros((5, 3), np.float32))  # K mismatch with input 4
    with pytest.raises(VerificationError, match="MatMul 'mm'"):
        verify(g)


def test_batchnorm_parameter_shapes_conflict_only_when_concrete():
    """tf2onnx's layer norm feeds BatchNormalization computed scale / mean / var whose shapes are
    symbolic under different names: they may be equal, so only concrete sizes can conflict."""
    def bn(shapes):
        g = Graph("bn")
        x = g.add_input("x", np.float32, (1, "C", 4, 1))
        ins = [x] + [g.add_input(k, np.float32, sh) for k, sh in zip(("s", "b", "m", "v"), shapes)]
        n = g.add_node("BatchNormalization", ins, ["y"], name="bn")
        g.outputs.append(n.outputs[0])
        return g

    verify(bn([("unk__1",), ("unk__2",), ("unk__3",), ("unk__3",)]))
    verify(bn([(4,), (4,), ("m",), (4,)]))
    with pytest.raises(VerificationError, match="BatchNormalization 'bn': scale/bias/mean/var shapes differ"):
        verify(bn([(4,), (4,), (5,), (4,)]))


def test_conv_weight_vs_attribute_check():
    g = Graph("c")
    x = g.add_input("x", np.float32, (1, 4, 8, 8))
    w = g.add_initializer("w", np.zeros((8, 2, 3, 3), np.float32))
    n = g.add_node("Conv", [x, w], ["y"], {"kernel_shape": [3, 3], "group": 1})
    g.outputs.append(n.outputs[0])
    with pytest.raises(VerificationError, match="input has 4 channels but weight expects 2"):
        verify(g)
    n.attrs["group"] = 2
    verify(g)


def test_round_trip_tiny_through_ort():
    g = _tiny()
    model = to_onnx_model(g)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    y = run(model, {"x": x})["y"]
    np.testing.assert_allclose(y, np.maximum(x @ g.initializers["w"].const, 0), rtol=1e-6)


def _constant_node_model(opset=11):
    w = np.random.default_rng(1).standard_normal((3, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
             helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Softmax", ["c"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "constnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_constant_nodes_become_initializers_and_symbolic_dims_kept():
    m = _constant_node_model()
    g = from_onnx(m)
    assert "w" in g.initializers and not g.find("Constant")
    assert g.inputs[0].shape == ("batch", 2, 5, 5)
    assert g.outputs[0].shape[0] == "batch"
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5)).astype(np.float32)
    a = run(m, {"x": x})["y"]
    b = run(g, {"x": x})["y"]
    assert max_rel_err(a, b) <= 1e-6


def test_old_opset_upgraded_or_named_error():
    g = from_onnx(_constant_node_model(opset=9))
    assert g.opset >= 11 and g.meta.get("upgraded_from_opset") == 9


def test_external_data(tmp_path):
    m = _constant_node_model(opset=13)
    g = from_onnx(m)
    model = to_onnx_model(g)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    g2 = from_onnx(path)
    np.testing.assert_array_equal(g2.initializers["w"].const, g.initializers["w"].const)


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        from_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not onnx at all\n")
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        from_onnx(bad)
    good = tmp_path / "good.onnx"
    onnx.save_model(_constant_node_model(13), str(good))
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="trunc.onnx"):
        from_onnx(trunc)


def _if_model():
    then_g = helper.make_graph([helper.make_node("Add", ["x", "bias"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Mul", ["x", "bias"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    bias = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "bias")
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    graph = helper.make_graph(nodes, "ifnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializer=[bias, zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_if_subgraph_carried_and_captures_tracked():
    m = _if_model()
    g = from_onnx(m)
    (if_node,) = g.find("If")
    assert {v.name for v in if_node.implicit_inputs} == {"x", "bias"}
    assert (if_node, -1) in g.initializers["bias"].uses
    out = to_onnx_model(g)
    assert out.graph.node[-1].attribute[0].g == m.graph.node[-1].attribute[0].g or \
        {a.name: a.g for a in out.graph.node[-1].attribute} == {a.name: a.g for a in m.graph.node[-1].attribute}
    for x in (np.array([1, 2], np.float32), np.array([-1, -2], np.float32)):
        np.testing.assert_array_equal(run(m, {"x": x})["y"], run(g, {"x": x})["y"])


def test_to_onnx_deterministic():
    m = _if_model()
    a = to_onnx_model(from_onnx(m)).SerializeToString()
    b = to_onnx_model(from_onnx(m)).SerializeToString()
    assert a == b


def test_unknown_domain_op_carried():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("FancyOp", ["r"], ["y"], domain="com.example", alpha=0.5, mode="fast")]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    g = from_onnx(m)
    out = to_onnx_model(g)
    assert out.graph.node[1] == m.graph.node[1] or (
        out.graph.node[1].op_type == "FancyOp" and out.graph.node[1].domain == "com.example"
        and sorted((a.name, helper.get_attribute_value(a)) for a in out.graph.node[1].attribute)
        == sorted((a.name, helper.get_attribute_value(a)) for a in m.graph.node[1].attribute))


def test_copy_is_deep_and_independent():
    g = from_onnx(_if_model())
    c = g.copy()
    verify(c)
    c.initializers["bias"].set_const(np.zeros(2, np.float32))
    c.remove_node(c.find("If")[0], force=True)
    assert g.find("If") and g.initializers["bias"].const[0] == 1.5
    assert [n.name for n in g.copy().nodes] == [n.name for n in g.nodes]


def test_replace_refuses_to_break_subgraph_captures():
    g = from_onnx(_if_model())
    x = g.inputs[0]
    r = g.add_node("Relu", [x], name="r")
    with pytest.raises(IRError, match="subgraphs of"):
        g.replace_all_uses_with(x, r.outputs[0])
