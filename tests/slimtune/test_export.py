"""ONNX export parity: ONNX Runtime matches PyTorch on shapes other than the export example."""

import numpy as np
import pytest
import torch

from slimtune.artifact import Artifact
from slimtune.export import export_onnx, input_names, ort_session, validate_onnx
from slimtune.models import load_pretrained
from slimtune.recipe import TaskConfig
from slimtune.tasks import Collator, task_kind

from tests.conftest import tiny_texts

CASES = {
    "classification": ("tiny_bert", "AutoModelForSequenceClassification"),
    "embedding": ("tiny_bert", "AutoModel"),
    "causal-lm": ("tiny_llama", "AutoModelForCausalLM"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_onnx_matches_pytorch_with_dynamic_batch_and_sequence(kind, request, tmp_path, tiny_csv):
    fixture, auto = CASES[kind]
    model, tok = load_pretrained(str(request.getfixturevalue(fixture)), auto, num_labels=2 if kind == "classification" else None)
    task = TaskConfig(kind=kind, data=str(tiny_csv), text="review", label="sentiment", max_length=16)
    art = Artifact(model=model.eval(), tokenizer=tok, task=task, labels=[0, 1])
    path = export_onnx(art, tmp_path / "m.onnx")
    session = ort_session(path)
    names = input_names(art)
    assert [i.name for i in session.get_inputs()] == list(names)
    collate = Collator(tok, 16, kind)
    for n in (1, 5):  # batch sizes and padded lengths unlike the export example
        batch = collate([{"text": t, "label": y} for t, y in tiny_texts(n, seed=n)])
        out = session.run(None, {k: batch[k].numpy() for k in names})[0]
        with torch.no_grad():
            ref = task_kind(kind).forward_export(art.model, **{k: batch[k] for k in names}).numpy()
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    report = validate_onnx(art, path, [collate([{"text": t, "label": y} for t, y in tiny_texts(20)])])
    assert report["max_abs_diff"] < 1e-4 and report["prediction_agreement"] == 1.0 and report["examples"] == 20
