"""`sg.finetune` on lowered graphs: the three schemes, the knowledge kinds, data forms, metrics."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import slimgraph as sg  # noqa: E402
from slimgraph.errors import BadOptionError  # noqa: E402
from slimgraph.runtime.metrics import evaluate, load_data  # noqa: E402
from tests.kit.data import DIGITS  # noqa: E402

TRAIN = DIGITS.with_name("digits_train.npz")
TEST = DIGITS.with_name("digits_test.npz")


@pytest.fixture(scope="module")
def setup() -> dict:
    model = sg.load(DIGITS)
    with np.load(TRAIN) as archive:  # all 1347 rows: 22 steps per epoch refresh BN statistics
        train = {"image": archive["image"], "labels": archive["labels"]}
        small = {"image": archive["image"][:320], "labels": archive["labels"][:320]}
    with np.load(TEST) as archive:
        val = {"image": archive["image"][:200], "labels": archive["labels"][:200]}
    return {"model": model, "pruned": sg.prune(model, ratio=0.5), "small": small, "val": val,
            "train": train}


def _weights(model) -> dict[str, np.ndarray]:  # noqa: ANN001
    return {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}


def _moved(before: dict, after: dict) -> list[str]:
    return [k for k in before if not np.array_equal(before[k], after[k])]


def test_online_scheme_trains_student_and_reports_it(setup) -> None:  # noqa: ANN001
    pruned = setup["pruned"]
    before = _weights(pruned)
    trained, report = sg.finetune_with_report(
        pruned, setup["train"], teacher=setup["model"], scheme="online", epochs=2, lr=3e-3,
        val=setup["val"], progress=False,
    )  # fmt: skip
    assert report.scheme == "online" and report.kd == ("response",)
    assert report.before < 0.5 and report.after > 0.8, (report.before, report.after)
    assert _moved(before, _weights(trained))
    assert _weights(pruned).keys() == before.keys()
    assert all(np.array_equal(before[k], v) for k, v in _weights(pruned).items())  # untouched


def test_self_scheme_distils_from_its_own_moving_average(setup) -> None:  # noqa: ANN001
    trained, report = sg.finetune_with_report(
        setup["pruned"], setup["train"], scheme="self", kd="response,feature",
        feature_layers=["block1"], epochs=2, lr=3e-3, val=setup["val"], progress=False,
    )  # fmt: skip
    assert report.scheme == "self" and report.kd == ("response", "feature")
    assert report.features == [("relu_2", "relu_2")]
    assert report.after > 0.8 and report.after > report.before


def test_self_scheme_without_labels_says_it_needs_them(setup) -> None:  # noqa: ANN001
    """The moving average starts as the model: without labels nothing would be learned."""
    with pytest.raises(BadOptionError) as caught:
        sg.finetune(setup["pruned"], {"image": setup["small"]["image"]}, scheme="self")
    assert str(caught.value) == (
        "nothing to learn from: scheme 'self' needs labels (its teacher, the model's own moving "
        "average, starts equal to the model and only steadies what labels teach), and data has "
        "no labels ('labels'): add them (labels= names their key) or give a teacher (teacher=) "
        "with scheme 'offline' or 'online'")


def test_relation_kd_on_a_named_layer_trains(setup) -> None:  # noqa: ANN001
    trained, report = sg.finetune_with_report(
        setup["pruned"], setup["train"], teacher=setup["model"], kd=("response", "relation"),
        relation_layer="block2", epochs=2, lr=3e-3, progress=False,
    )  # fmt: skip
    assert report.relation == ("relu_5", "relu_5")
    assert report.history.records[1].loss > 0
    assert evaluate(trained, load_data(TEST, trained)).accuracy > 0.8


def test_without_labels_the_teacher_alone_teaches_and_val_is_cosine(setup) -> None:  # noqa: ANN001
    unlabelled = {"image": setup["train"]["image"]}
    trained, report = sg.finetune_with_report(
        setup["pruned"], unlabelled, teacher=setup["model"], epochs=2, lr=3e-3,
        val={"image": setup["val"]["image"]}, progress=False,
    )  # fmt: skip
    assert report.metric == "cosine"
    assert report.after > report.before + 0.2 and report.after > 0.9, (report.before, report.after)


def test_iterables_of_feed_dicts(setup) -> None:  # noqa: ANN001
    small = setup["small"]
    batches = [{"image": small["image"][i : i + 64], "labels": small["labels"][i : i + 64]}
               for i in range(0, 320, 64)]  # fmt: skip
    _, report = sg.finetune_with_report(setup["pruned"], batches, epochs=2, lr=3e-3,
                                        progress=False)  # fmt: skip
    assert [r.steps for r in report.history.records] == [0, 5, 5]
    assert report.samples is None
    once = (batch for batch in batches)
    sg.finetune(setup["pruned"], once, epochs=1, progress=False)  # one epoch from a generator
    with pytest.raises(BadOptionError, match="^data: a one-shot iterator feeds one epoch only"):
        sg.finetune(setup["pruned"], (batch for batch in batches), epochs=2)


def test_teacher_with_other_inputs_is_refused(setup) -> None:  # noqa: ANN001
    from tests.kit.exports import exported_model

    other = exported_model("mlp")
    with pytest.raises(BadOptionError) as caught:
        sg.finetune(setup["pruned"], setup["small"], teacher=other)
    assert str(caught.value).startswith("the teacher's inputs (x (float32)) differ from the "
                                        "model's (image (float32))")  # fmt: skip


def test_finetune_does_not_import_torch_until_called() -> None:
    import subprocess
    import sys

    code = "import sys, slimgraph; slimgraph.finetune; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)  # fmt: skip
    assert result.stdout.strip() == "False"


def test_biases_feeding_batchnorm_are_not_trained(setup) -> None:  # noqa: ANN001
    from slimgraph.runtime.finetune import biases_before_batchnorm

    pruned = setup["pruned"]
    # prune folds the exporter's zero Conv biases into initializers; each feeds a BatchNorm
    frozen = biases_before_batchnorm(pruned)
    assert frozen == ["val_5", "val_18", "val_29", "val_40", "val_51", "val_62"]
    assert biases_before_batchnorm(setup["model"]) == []  # there they are computed, not weights
    before = _weights(pruned)
    trained = sg.finetune(pruned, setup["small"], epochs=1, lr=3e-3, progress=False)
    after = _weights(trained)
    assert all(np.array_equal(before[name], after[name]) for name in frozen)
    assert {"fc.weight", "fc.bias", "stem.0.weight"} <= set(_moved(before, after))
