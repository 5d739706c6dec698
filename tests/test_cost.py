"""A MoTE call costs what a dense BERT call costs: XLA's cost analysis of the compiled programs agrees."""

import jax
import jax.numpy as jnp
import pytest

from mote_jax.model import MoteConfig, MoteEncoder, init_params

CONFIG = MoteConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)


def _flops(config: MoteConfig, expert: str) -> float:
  params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  ids = jax.ShapeDtypeStruct((16, 128), jnp.int32)

  def embed(p, input_ids, mask):
    from flax import linen as nn
    return MoteEncoder(config).apply({"params": nn.unbox(p)}, input_ids, mask, expert=expert,
                                     method=MoteEncoder.embed)

  cost = jax.jit(embed).lower(params, ids, ids).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


@pytest.mark.parametrize("expert", ["query", "passage"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_mote_flops_match_siamese(expert, scan_layers):
  siamese = _flops(CONFIG.replace(tower_mode="siamese", scan_layers=scan_layers), expert)
  mote = _flops(CONFIG.replace(tower_mode="mote", scan_layers=scan_layers), expert)
  separated = _flops(CONFIG.replace(tower_mode="separated", scan_layers=scan_layers), expert)
  # The dense layers and attention of BERT-L6-H384 on 16 x 128 tokens, counted by hand.
  h, f, length, tokens = CONFIG.hidden_size, CONFIG.intermediate_size, 128, 16 * 128
  analytic = tokens * CONFIG.num_layers * (8 * h * h + 4 * h * f + 4 * length * h)
  # XLA's cost analysis counts a while-loop body once, so a scanned stack reports one layer's cost.
  counted_layers = 1 if scan_layers else CONFIG.num_layers
  expected = analytic * counted_layers / CONFIG.num_layers
  assert abs(siamese - expected) <= 0.05 * expected, (siamese, expected)
  assert abs(mote - siamese) <= 0.01 * siamese, (mote, siamese)
  assert abs(separated - siamese) <= 0.01 * siamese, (separated, siamese)
