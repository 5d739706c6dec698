"""An independent PyTorch CoT-MAE pre-training step: HF `BertForMaskedLM` + `BertLayer` decoder + AdamW.

Written the way the official CoT-MAE code is (HF BERT, the tied MLM head, [A's CLS; embeddings(B)[1:]] through
2 BERT layers), with the same optimiser recipe as `mote_jax.training.optimizer` (AdamW, no decay on biases and
LayerNorm, global-norm clipping at 1.0, linear warm-up/decay). Weights are converted from the JAX decoder here,
independently of `mote_jax.hf_interop`.

`masked_only=None` computes MLM logits at every position (HF `BertForMaskedLM`, the official code);
`masked_only=(P_enc, P_dec)` computes them at the first P masked positions of each row only, the same static-shape
gather as `ObjectiveConfig.*_max_predictions` (so `torch.compile` sees static shapes).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.bert.modeling_bert import BertLayer

IGNORE_INDEX = -100


def decoder_layers_from_jax(bert_config, decoder_params) -> torch.nn.ModuleList:
  """HF BertLayers holding the JAX `CotMaeDecoder` weights (unboxed, Python-loop layer stack)."""
  h = bert_config.hidden_size
  layers = []
  stack = decoder_params["layers"]
  for j in range(len(stack)):
    p = {k: v for k, v in stack[f"layer_{j}"].items()}
    t = lambda x: torch.tensor(np.asarray(x, np.float32))  # noqa: E731
    att, ffn = p["attention"], p["ffn"]
    sd = {}
    for proj in ("query", "key", "value"):
      sd[f"attention.self.{proj}.weight"] = t(att[f"{proj}_kernel"]).reshape(h, h).T
      sd[f"attention.self.{proj}.bias"] = t(att[f"{proj}_bias"]).reshape(h)
    sd["attention.output.dense.weight"] = t(att["output_kernel"]).reshape(h, h).T
    sd["attention.output.dense.bias"] = t(att["output_bias"])
    sd["attention.output.LayerNorm.weight"] = t(att["output_layer_norm"]["scale"])
    sd["attention.output.LayerNorm.bias"] = t(att["output_layer_norm"]["bias"])
    sd["intermediate.dense.weight"] = t(ffn["intermediate_kernel"][0]).T
    sd["intermediate.dense.bias"] = t(ffn["intermediate_bias"][0])
    sd["output.dense.weight"] = t(ffn["output_kernel"][0]).T
    sd["output.dense.bias"] = t(ffn["output_bias"][0])
    sd["output.LayerNorm.weight"] = t(ffn["layer_norm_scale"][0])
    sd["output.LayerNorm.bias"] = t(ffn["layer_norm_bias"][0])
    layer = BertLayer(bert_config)
    layer.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True)
    layers.append(layer)
  return torch.nn.ModuleList(layers)


def _gather_masked(hidden, labels, count):
  """The first `count` predicted positions of each row (masked first, in order): ([B, P, H], [B, P])."""
  order = torch.argsort((labels == IGNORE_INDEX).to(torch.int32), dim=1, stable=True)[:, :count]
  return (hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1])), labels.gather(1, order))


class CotMae(torch.nn.Module):
  """Encoder MLM + CoT-MAE decoder MLM; `forward(batch) -> loss` (the sum of both means)."""

  def __init__(self, mlm_model, decoder_layers: torch.nn.ModuleList, masked_only: tuple[int, int] | None = None):
    super().__init__()
    self.mlm = mlm_model
    self.decoder = decoder_layers
    self.masked_only = masked_only
    self.ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

  def _mlm_loss(self, hidden, labels, count):
    if count is not None:
      hidden, labels = _gather_masked(hidden, labels, count)
    logits = self.mlm.cls(hidden)
    return self.ce(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

  def forward(self, anchor_input_ids, anchor_attention_mask, anchor_labels, context_input_ids,
              context_attention_mask, context_labels):
    enc_p, dec_p = self.masked_only or (None, None)
    hidden = self.mlm.bert(input_ids=anchor_input_ids, attention_mask=anchor_attention_mask).last_hidden_state
    encoder_loss = self._mlm_loss(hidden, anchor_labels, enc_p)
    embeddings = self.mlm.bert.embeddings(input_ids=context_input_ids)
    x = torch.cat([hidden[:, :1], embeddings[:, 1:]], dim=1)
    bias = (1.0 - context_attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    for layer in self.decoder:
      x = layer(x, attention_mask=bias)
      x = x[0] if isinstance(x, tuple) else x
    decoder_loss = self._mlm_loss(x, context_labels, dec_p)
    return encoder_loss + decoder_loss


def make_optimizer(module: torch.nn.Module, lr=1e-4, weight_decay=0.01, warmup=1000, total=100_000):
  """AdamW (fused where available) without decay on biases/LayerNorm, linear warm-up then decay."""
  decay, no_decay = [], []
  for name, p in module.named_parameters():
    (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
  groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
  try:
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
  except (RuntimeError, TypeError):
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)

  def schedule(step):
    if step < warmup:
      return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))

  return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


class TorchStep:
  """One training step (forward, backward, clip, AdamW, schedule) of a `CotMae` module, eager or compiled."""

  def __init__(self, module: CotMae, compile: bool = False, max_grad_norm: float = 1.0):
    self.module = module.train()
    self.forward = torch.compile(module) if compile else module
    self.optimizer, self.scheduler = make_optimizer(module)
    self.max_grad_norm = max_grad_norm
    self.params = [p for p in module.parameters() if p.requires_grad]

  def __call__(self, batch: dict[str, np.ndarray]) -> float:
    tensors = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items()}
    return optimizer_step(self.forward(**tensors), self)


def optimizer_step(loss, trainer) -> float:
  """One PyTorch training step after the forward pass: backward, clip to `trainer.max_grad_norm`, AdamW and
  schedule steps, gradients cleared; returns the loss. Shared by the pre-training and fine-tuning references."""
  loss.backward()
  torch.nn.utils.clip_grad_norm_(trainer.params, trainer.max_grad_norm)
  trainer.optimizer.step()
  trainer.scheduler.step()
  trainer.optimizer.zero_grad(set_to_none=True)
  return float(loss.detach())
