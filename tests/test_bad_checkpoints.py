"""Checkpoints that do not fit get errors naming the tensor, the file, and the expected and found shapes."""

import json
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from mote_jax.hf_interop import CheckpointError, from_hf


@pytest.fixture
def checkpoint(random_bert_dir, tmp_path):
  """A writable copy of the small random BERT checkpoint."""
  out = tmp_path / "ckpt"
  shutil.copytree(random_bert_dir, out)
  return out


def _edit_tensors(directory, edit):
  tensors = load_file(str(directory / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(directory / "model.safetensors"))


def test_missing_tensor(checkpoint):
  _edit_tensors(checkpoint, lambda t: t.pop("bert.encoder.layer.2.output.dense.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensor 'encoder\.layer\.2\.output\.dense\.weight' "
                                            r"\(expected shape \(64, 128\)\)"):
    from_hf(checkpoint)


def test_shape_mismatch(checkpoint):
  def edit(tensors):
    tensors["bert.encoder.layer.1.intermediate.dense.weight"] = tensors[
        "bert.encoder.layer.1.intermediate.dense.weight"][:100]
  _edit_tensors(checkpoint, edit)
  with pytest.raises(CheckpointError) as error:
    from_hf(checkpoint, tower_mode="separated")
  message = str(error.value)
  assert "'encoder.layer.1.intermediate.dense.weight'" in message
  assert "shape (100, 64), expected (128, 64)" in message
  assert "model.safetensors" in message


def test_non_bert_architecture(checkpoint):
  config = json.loads((checkpoint / "config.json").read_text())
  config.update(model_type="roberta", architectures=["RobertaModel"])
  (checkpoint / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"model_type='roberta'.*not a BERT checkpoint"):
    from_hf(checkpoint)


def test_no_weights_file(checkpoint):
  (checkpoint / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="no model.safetensors"):
    from_hf(checkpoint)
