"""Tests for the nnsculpt model zoo (nnsculpt.models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx

import nnsculpt.models as zoo
from nnsculpt.models import UnknownModelError
from nnsculpt.models.data import digits_npz, digits_split_indices, load_digits_dataset
from nnsculpt.models.train import evaluate, train_classifier

EXPECTED = {
    "bert_tiny", "c2f", "densenet_block", "digits_resnet", "mobilenetv2", "resnet18",
    "resnet20", "resnet56", "se_net", "vgg11_bn", "vit_tiny",
}
NAMES = zoo.list_models()

_cache: dict = {}


def _model(name: str) -> torch.nn.Module:
    """get_model(name), built once per test session (models are not mutated)."""
    if name not in _cache:
        _cache[name] = zoo.get_model(name)
    return _cache[name]


def test_list_models() -> None:
    assert NAMES == sorted(NAMES)
    assert set(NAMES) == EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_builds_runs_and_traces(name: str) -> None:
    spec = zoo.model_spec(name)
    model = _model(name)
    assert isinstance(model, torch.nn.Module)
    assert not model.training
    inputs = zoo.example_inputs(name, batch=2)
    assert len(inputs) == len(zoo.input_names(name)) == 1
    assert inputs[0].shape == (2,) + spec.input_shape
    assert inputs[0].dtype == spec.input_dtype
    with torch.no_grad():
        out = model(*inputs)
        assert out.shape == (2, spec.num_classes)
        assert torch.isfinite(out).all()
        assert out.std() > 0
        traced = torch.fx.symbolic_trace(model)
        traced_out = traced(*inputs)
    assert torch.equal(out, traced_out)
    # Default configurations are shape-static: no x.shape / x.size() queries.
    for node in traced.graph.nodes:
        assert not (node.op == "call_method" and node.target in ("size", "dim")), node
        assert not (node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr"
                    and node.args[1:] == ("shape",)), node


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_weights(name: str) -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = zoo.get_model(name).state_dict()
    after = torch.rand(3)
    assert torch.equal(before, after), "get_model must not disturb the global RNG"
    b = _model(name).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_seed_changes_weights() -> None:
    a = zoo.get_model("resnet20", seed=1).state_dict()
    b = _model("resnet20").state_dict()
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("bert_tiny", "vit_tiny")])
def test_batchnorm_is_nontrivial(name: str) -> None:
    bns = [m for m in _model(name).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert (bn.running_var > 0).all()


def test_kwargs_forwarded() -> None:
    m = zoo.get_model("resnet18", num_classes=7, in_channels=1)
    x = zoo.example_inputs("resnet18", batch=1, in_channels=1)
    assert x[0].shape == (1, 1, 64, 64)
    assert m(*x).shape == (1, 7)
    small = zoo.get_model("mobilenetv2", width_mult=0.5)
    assert sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in _model("mobilenetv2").parameters())


def test_example_inputs_deterministic() -> None:
    a = zoo.example_inputs("resnet20", batch=4, seed=3)[0]
    b = zoo.example_inputs("resnet20", batch=4, seed=3)[0]
    c = zoo.example_inputs("resnet20", batch=4, seed=4)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = zoo.example_inputs("bert_tiny", batch=3)[0]
    assert ids.dtype == torch.int64 and ids.shape == (3, 16)
    assert int(ids.min()) >= 0 and int(ids.max()) < 1000


def test_io_names() -> None:
    assert zoo.input_names("resnet20") == ("input",)
    assert zoo.output_names("resnet20") == ("logits",)
    assert zoo.input_names("bert_tiny") == ("input_ids",)
    for name in NAMES:
        assert len(zoo.output_names(name)) == 1


def test_unknown_model() -> None:
    with pytest.raises(UnknownModelError, match="unknown zoo model 'nope'") as info:
        zoo.get_model("nope")
    assert isinstance(info.value, KeyError)
    assert "resnet20" in str(info.value)
    for fn in (zoo.example_inputs, zoo.input_names, zoo.output_names, zoo.model_spec):
        with pytest.raises(UnknownModelError):
            fn("nope")


def test_pretrained_only_where_available() -> None:
    with pytest.raises(ValueError):
        zoo.get_model("resnet20", pretrained=True)


def test_checkpoint_is_small() -> None:
    path = zoo.checkpoint_path("digits_resnet")
    assert path is not None and path.is_file()
    assert path.stat().st_size < 300 * 1024


def test_pretrained_digits_accuracy() -> None:
    model = zoo.get_model("digits_resnet", pretrained=True)
    assert not model.training
    X, y = load_digits_dataset(size=16, split="test")
    acc = evaluate(model, X, y)
    assert acc >= 0.95, acc
    # The fx-traced pretrained model must agree exactly.
    traced = torch.fx.symbolic_trace(model)
    xt = torch.from_numpy(X[:32])
    with torch.no_grad():
        assert torch.equal(model(xt), traced(xt))


def test_digits_dataset_splits() -> None:
    idx = digits_split_indices()
    sizes = {k: len(idx[k]) for k in ("train", "val", "test")}
    assert sizes == {"train": 1257, "val": 269, "test": 271}
    all_idx = np.concatenate([idx["train"], idx["val"], idx["test"]])
    assert len(np.unique(all_idx)) == 1797
    X, y = load_digits_dataset(size=16, split="train")
    assert X.shape == (1257, 1, 16, 16) and X.dtype == np.float32
    assert y.shape == (1257,) and y.dtype == np.int64
    assert abs(float(X.mean())) < 1e-3 and abs(float(X.std()) - 1.0) < 1e-3
    X2, y2 = load_digits_dataset(size=16, split="train")
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    X8, _ = load_digits_dataset(size=8, split="val")
    assert X8.shape == (269, 1, 8, 8)
    with pytest.raises(ValueError):
        load_digits_dataset(split="bogus")


def test_digits_npz(tmp_path) -> None:
    path = digits_npz(tmp_path / "digits_test.npz", "test", n=20)
    with np.load(path) as data:
        assert set(data.files) == {"input", "labels"}
        assert data["input"].shape == (20, 1, 16, 16) and data["input"].dtype == np.float32
        assert data["labels"].shape == (20,) and data["labels"].dtype == np.int64
    X, y = load_digits_dataset(16, "test")
    with np.load(path) as data:
        assert np.array_equal(data["input"], X[:20]) and np.array_equal(data["labels"], y[:20])


def test_train_classifier_deterministic() -> None:
    X, y = load_digits_dataset(size=8, split="train")
    X, y = X[:256], y[:256]

    def run():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 10))
        hist = train_classifier(model, X, y, epochs=3, lr=0.1, batch_size=32, seed=0,
                                X_val=X[:64], y_val=y[:64])
        return model, hist

    m1, h1 = run()
    m2, h2 = run()
    assert h1["loss"] == h2["loss"] and h1["val_acc"] == h2["val_acc"]
    assert len(h1["loss"]) == 3 and h1["loss"][-1] < h1["loss"][0]
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert not m1.training
    assert evaluate(m1, X, y) > 0.5
