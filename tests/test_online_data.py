"""Online pre-training input: CoT-MAE's sampling distribution against the reference algorithm, O(1) resume,
host layout, index-keyed masks, whole-word masking and the data state kept beside the checkpoints."""

import json
import math
import os
import random

import numpy as np
import pytest
import scipy.stats
from array_record.python.array_record_module import ArrayRecordWriter

from mote_jax.data import IGNORE_LABEL, MaskingConfig, WordPieceVocabulary, records
from mote_jax.data.online import RecordBatches, register_records_task
from mote_jax.data.sampling import CONTEXT_TYPES, SpanSampling, example_keys, mask_batch, sample_spans

MAX_LEN = 128
NUM_SAMPLES = 12_000
P_MIN = 1e-3  # fixed seeds: a p-value this small means the distributions differ


# --- the reference algorithm (caskcsg/ir cotmae/make_cotmae_data.py + data.py), written independently ---------


def reference_spans(lengths, rng, max_len, short_prob):
  """Greedy packing: list of spans, each a list of sentence indices."""

  def target():
    return rng.randint(2, max_len) if rng.random() < short_prob else max_len

  spans, current, size, goal, goals = [], [], 0, target(), []
  for i, n in enumerate(lengths):
    current.append(i)
    size += n
    if size > goal:
      spans.append(current)
      goals.append(goal)
      current, size, goal = [], 0, target()
  if current:
    spans.append(current)
    goals.append(goal)
  return spans, goals


def reference_sample(lengths, rng, max_len=MAX_LEN, short_prob=0.15, window=100):
  """One training example of a document: (context type, anchor ids, context ids, anchor short, spans, offset).

  offset: the context span's index minus the anchor's (nearby, random), or the ids shared with the anchor
  (overlap)."""
  spans, goals = reference_spans(lengths, rng, max_len, short_prob)
  m = len(spans)
  tokens = lambda sentences: sum(lengths[s] for s in sentences)
  i = rng.randint(0, m - 1)
  kind = rng.choice(CONTEXT_TYPES)
  if kind == "nearby":
    j = rng.choice([j for j in (i - 1, i + 1) if 0 <= j < m])
    context, offset = tokens(spans[j]), j - i
  elif kind == "random":
    window_ids = [j for j in range(i - window, i + window + 1) if j != i and 0 <= j < m]
    j = rng.choice(window_ids) if window_ids else i
    context, offset = tokens(spans[j]), j - i
  else:
    sentences = spans[i]
    bound = len(sentences) // 2
    k = 1 if bound < 2 else rng.randint(1, bound)
    if i < m - 1:
      chosen = sentences[-k:]
      remain = max_len - tokens(chosen)
      nxt = sentences[-1] + 1
      while remain > 0 and nxt < len(lengths):
        remain -= lengths[nxt]
        nxt += 1
      context = max_len - remain
    else:
      chosen = sentences[:k]
      remain = max_len - tokens(chosen)
      prev = sentences[0] - 1
      while remain > 0 and prev >= 0:
        remain -= lengths[prev]
        prev -= 1
      context = max_len - remain
    offset = tokens(chosen)
  return kind, tokens(spans[i]), context, goals[i] < max_len, m, offset


@pytest.fixture(scope="module")
def documents():
  """Sentence lengths of 400 documents that give >= 2 spans at the full target (what the offline job keeps)."""
  rng = np.random.default_rng(7)
  docs = []
  while len(docs) < 400:
    n = int(rng.integers(2, 45))
    lengths = np.clip(rng.lognormal(3.0, 0.7, n).astype(int), 1, 200).tolist()
    if len(reference_spans(lengths, random.Random(0), MAX_LEN, 0.0)[0]) >= 2:
      docs.append(lengths)
  return docs


def _chi2(ours, theirs, bins):
  table = np.stack([np.histogram(ours, bins)[0], np.histogram(theirs, bins)[0]])
  table = table[:, table.sum(0) > 0]
  return scipy.stats.chi2_contingency(table)[1]


def _sentence_table(documents, doc_of):
  """Sentence lengths of the documents `doc_of` as a zero-padded [rows, width] array, and sentences per row."""
  width = max(len(d) for d in documents)
  lengths = np.zeros((len(doc_of), width), np.int64)
  for row, d in enumerate(doc_of):
    lengths[row, : len(documents[d])] = documents[d]
  return lengths, np.asarray([len(documents[d]) for d in doc_of])


def test_sampling_distribution_matches_reference(documents):
  doc_of = np.arange(NUM_SAMPLES) % len(documents)
  lengths, counts = _sentence_table(documents, doc_of)
  out = sample_spans(lengths, counts, example_keys(3, np.arange(NUM_SAMPLES)), max_len=MAX_LEN,
                     sampling=SpanSampling())
  kind = out["context_type"]
  anchor_len = out["anchor_end"] - out["anchor_start"]
  context_len = out["context_end"] - out["context_start"]

  rng = random.Random(11)
  ref = [reference_sample(documents[d], rng) for d in doc_of]
  ref_kind = np.asarray([CONTEXT_TYPES.index(r[0]) for r in ref])
  ref_anchor, ref_context = np.asarray([r[1] for r in ref]), np.asarray([r[2] for r in ref])
  ref_short, ref_spans = np.asarray([r[3] for r in ref]), np.asarray([r[4] for r in ref])
  ref_offset = np.asarray([r[5] for r in ref])

  # Context types: uniform over the three, as the reference's 'mixed'.
  assert scipy.stats.chisquare(np.bincount(kind, minlength=3)).pvalue > P_MIN
  assert scipy.stats.chi2_contingency(np.stack([np.bincount(kind, minlength=3),
                                                np.bincount(ref_kind, minlength=3)]))[1] > P_MIN
  # Short spans: the share of anchors whose target was short, and the spans per document.
  assert scipy.stats.chi2_contingency([[out["anchor_short"].sum(), (~out["anchor_short"]).sum()],
                                       [ref_short.sum(), (~ref_short).sum()]])[1] > P_MIN
  assert 0.05 < out["anchor_short"].mean() < 0.3
  assert _chi2(out["num_spans"], ref_spans, np.arange(0, 40)) > P_MIN
  # Span lengths (anchor) and each context type's lengths, binned finely at the short end.
  bins = [0, 4, 8, 16, 32, 48, 64, 96, 128, 129, 140, 160, 200, 300, 10_000]
  assert _chi2(anchor_len, ref_anchor, bins) > P_MIN
  for t in range(3):
    assert _chi2(context_len[kind == t], ref_context[ref_kind == t], bins) > P_MIN, CONTEXT_TYPES[t]
  # Which span a nearby / random context is, and how many ids an overlap shares with its anchor.
  offset = out["context_span"] - out["anchor_span"]
  for t in (0, 2):
    assert _chi2(offset[kind == t], ref_offset[ref_kind == t], np.arange(-41, 42)) > P_MIN, CONTEXT_TYPES[t]
  last = out["anchor_span"] == out["num_spans"] - 1
  shared = np.where(last, out["context_end"] - out["anchor_start"], out["anchor_end"] - out["context_start"])
  assert _chi2(shared[kind == 1], ref_offset[ref_kind == 1], bins) > P_MIN
  # A wrong rule is caught: e.g. never-short targets give another anchor length distribution.
  wrong = sample_spans(lengths, counts, example_keys(3, np.arange(NUM_SAMPLES)), max_len=MAX_LEN,
                       sampling=SpanSampling(short_span_prob=0.0))
  assert _chi2(wrong["anchor_end"] - wrong["anchor_start"], ref_anchor, bins) < P_MIN


def test_context_structure(documents):
  """Nearby contexts are adjacent spans, random ones other spans in the window, overlaps share the anchor's end."""
  n = 3000
  doc_of = np.arange(n) % len(documents)
  lengths, counts = _sentence_table(documents, doc_of)
  out = sample_spans(lengths, counts, example_keys(5, np.arange(n)), max_len=MAX_LEN,
                     sampling=SpanSampling(window_size=2))
  a, c, kind = out["anchor_span"], out["context_span"], out["context_type"]
  assert (np.abs(a - c)[kind == 0] == 1).all()
  assert ((np.abs(a - c) <= 2) & (a != c))[kind == 2].all()
  overlap = kind == 1
  last = a == out["num_spans"] - 1
  # Not last: starts inside the anchor, at or after its start, and reaches past its end or the document's.
  inner = overlap & ~last
  assert (out["context_start"][inner] >= out["anchor_start"][inner]).all()
  assert (out["context_start"][inner] < out["anchor_end"][inner]).all()
  # Last: starts at or before the anchor's start and ends inside it.
  tail = overlap & last
  assert (out["context_end"][tail] <= out["anchor_end"][tail]).all()
  assert (out["context_end"][tail] > out["anchor_start"][tail]).all()


# --- the records pipeline ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab(minilm_path):
  return WordPieceVocabulary(minilm_path)


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory, vocab, scifact_sentences):
  """13 SciFact pseudo-documents (consecutive sentences) in 2 shards, with 1-3 queries each."""
  directory = tmp_path_factory.mktemp("records")
  ids = vocab.encode_batch(scifact_sentences[:400])
  docs = [ids[i: i + 3 + i % 20] for i in range(0, 13 * 25, 25)]
  for shard, chunk in enumerate((docs[:7], docs[7:])):
    writer = ArrayRecordWriter(os.fspath(directory / f"records-{shard:05d}-of-00002{records.SHARD_SUFFIX}"),
                               "group_size:1")
    for k, doc in enumerate(chunk):
      writer.write(records.serialize(f"{shard}-{k}", doc, [s[:6] for s in doc[: 1 + k % 3]]))
    writer.close()
  return directory


@pytest.fixture(scope="module")
def task(records_dir, vocab):
  return register_records_task("test_online.spans", os.fspath(records_dir), vocab=vocab, max_len=32,
                               overwrite=True)


BATCH = 8  # rows: 4 examples in both directions


def _take(task, start, count, **kwargs):
  it = RecordBatches(task, batch_size=kwargs.pop("batch_size", BATCH), seed=kwargs.pop("seed", 5),
                     start_step=start, **kwargs)
  try:
    return [next(it) for _ in range(count)]
  finally:
    it.close()


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("start", [1, 1000])
def test_resume_equals_uninterrupted_stream(task, start):
  uninterrupted = _take(task, 0, start + 3)[start:]
  resumed = _take(task, start, 3)
  assert all(_equal(x, y) for x, y in zip(uninterrupted, resumed))
  assert not _equal(resumed[0], resumed[1])


def test_resume_far_equals_examples_recomputed_alone(task):
  """Step 100000 of a 13-record corpus (~30k epochs in): each row recomputed from its example index alone."""
  start = 100_000
  resumed = _take(task, start, 3)
  for offset, batch in enumerate(resumed):
    examples = np.arange((start + offset) * 4, (start + offset + 1) * 4)
    alone = [task.pairs_of(np.asarray([i]), 5) for i in examples]
    expected = {k: np.concatenate([a[k] for a in alone]) for k in batch}
    assert _equal(batch, expected)
    assert _equal(batch, task.batch_at(start + offset, batch_size=BATCH, seed=5))


def test_hosts_take_contiguous_rows_and_masks_follow_the_index(task):
  whole = _take(task, 7, 1, batch_size=16)[0]
  hosts = [_take(task, 7, 1, batch_size=16, shard_index=h, num_shards=2)[0] for h in range(2)]
  assert _equal(whole, {k: np.concatenate([h[k] for h in hosts]) for k in whole})
  # Example 30 is example 2 of step 7 at 4 examples a step and example 6 of step 3 at 8: the same rows.
  small = _take(task, 7, 1)[0]
  assert _equal({k: v[4:6] for k, v in small.items()}, {k: v[12:14] for k, v in
                                                       _take(task, 3, 1, batch_size=16)[0].items()})
  other_seed = _take(task, 7, 1, seed=6)[0]
  assert not np.array_equal(small["anchor_labels"], other_seed["anchor_labels"])


def test_both_directions_and_epochs(task):
  batch = task.batch_at(0, batch_size=26, seed=5)  # 13 examples: exactly one epoch
  assert np.array_equal(batch["anchor_attention_mask"][0::2], batch["context_attention_mask"][1::2])
  assert np.array_equal(batch["context_attention_mask"][0::2], batch["anchor_attention_mask"][1::2])
  # One anchor per document per epoch: the epoch's record indices are a permutation, another in the next epoch.
  import tensorflow as tf
  first = task.record_indices(tf.range(13, dtype=tf.int64), 5).numpy()
  second = task.record_indices(tf.range(13, 26, dtype=tf.int64), 5).numpy()
  assert sorted(first) == list(range(13)) and sorted(second) == list(range(13))
  assert not np.array_equal(first, second)


def test_whole_word_masking_is_the_default(task, vocab):
  assert MaskingConfig().whole_word and task.spec.masking.whole_word
  batch = task.batch_at(0, batch_size=260, seed=1)
  info = vocab.info
  labels = batch["anchor_labels"]
  chosen = labels != IGNORE_LABEL
  original = np.where(chosen, labels, batch["anchor_input_ids"])
  # Words are masked whole: a piece continues a word (it is '##' after a maskable piece) iff its word's start...
  shift = lambda x: np.concatenate([np.zeros((len(x), 1), x.dtype), x[:, :-1]], 1)
  inside_word = info.continuation[original] & shift(~info.never_mask[original])
  # ... and a piece inside a word is chosen exactly when the piece before it is.
  assert np.array_equal(chosen[inside_word], shift(chosen)[inside_word])
  assert inside_word.sum() > 100 and chosen.any()


def test_mask_batch_rates(vocab):
  """Whole words at the ratio (stochastic rounding), 80/10/10 replacements, specials and padding untouched."""
  info = vocab.info
  rng = np.random.default_rng(0)
  ids = rng.choice(info.replacement_ids, (4000, 64)).astype(np.int32)
  ids[:, 0], ids[:, 40], ids[:, 41:] = info.cls_id, info.sep_id, info.pad_id
  inputs, labels = mask_batch(ids, example_keys(0, np.arange(4000)), ratio=0.3, info=info, whole_word=False)
  chosen = labels != IGNORE_LABEL
  assert not chosen[:, [0, 40]].any() and not chosen[:, 41:].any()
  per_row = chosen.sum(1)
  assert set(np.unique(per_row)) <= {math.floor(0.3 * 39), math.ceil(0.3 * 39)}
  assert abs(per_row.mean() - 0.3 * 39) < 0.05
  mask_share = (inputs[chosen] == info.mask_id).mean()
  kept_share = (inputs[chosen] == ids[chosen]).mean()
  assert abs(mask_share - 0.8) < 0.01 and abs(kept_share - 0.1) < 0.01


def test_all_spans_as_anchors(records_dir, vocab, task):
  """anchors='all': every document gives as many examples per epoch as it has full-target spans, one per slot."""
  import collections

  import tensorflow as tf
  from mote_jax.data.sampling import full_target_span_counts
  every = register_records_task("test_online.all", os.fspath(records_dir), vocab=vocab, max_len=32,
                                sampling=SpanSampling(anchors="all"), overwrite=True)
  per_epoch = every.examples_per_epoch
  parsed = records.parse(tf.constant(list(every.source.read(np.arange(13)))))["sentence_lengths"]
  counts = full_target_span_counts(parsed.to_tensor().numpy().astype(np.int64), parsed.row_lengths().numpy(), 32)
  assert per_epoch == counts.sum() > 13
  for epoch in range(2):
    record, slot, slots = (x.numpy() for x in every.locate(tf.range(epoch * per_epoch, (epoch + 1) * per_epoch,
                                                                      dtype=tf.int64), 5))
    assert collections.Counter(record.tolist()) == {d: int(c) for d, c in enumerate(counts)}
    assert sorted(zip(record, slot)) == [(d, j) for d in range(13) for j in range(counts[d])]
    assert (slots == counts[record]).all()
  # Slot j of M anchors a span of the j-th of M equal strata of the epoch's spans.
  n = 4000
  lengths = np.tile(np.asarray([[40, 50, 30, 60, 20, 70, 10, 80, 45, 35]]), (n, 1))
  slots = np.full(n, 4)
  slot = np.arange(n) % 4
  out = sample_spans(lengths, np.full(n, 10), example_keys(1, np.arange(n)), max_len=64,
                     sampling=SpanSampling(anchors="all"), anchor_slot=slot, anchor_slots=slots)
  a, m = out["anchor_span"], out["num_spans"]
  assert ((a >= np.floor(slot * m / 4)) & (a <= np.floor((slot + 1) * m / 4))).all()
  assert len(np.unique(a)) == m.max()  # every span index is reached
  first = _take(every, 0, 1)[0]
  assert first["anchor_input_ids"].shape == (BATCH, 32)
  assert every.data_state()["sampling"]["anchors"] == "all"
  assert task.examples_per_epoch == 13


def test_empty_record_is_a_clear_error(tmp_path, vocab):
  writer = ArrayRecordWriter(os.fspath(tmp_path / f"records-00000-of-00001{records.SHARD_SUFFIX}"), "group_size:1")
  writer.write(records.serialize("empty", []))
  writer.close()
  empty = register_records_task("test_online.empty", os.fspath(tmp_path), vocab=vocab, max_len=32, overwrite=True)
  with pytest.raises(ValueError, match=r"records without sentences at example indices \[0, 1\]"):
    empty.batch_at(0, batch_size=4, seed=0)


def test_query_pairs_from_records(records_dir, vocab):
  q2p = register_records_task("test_online.q2p", os.fspath(records_dir), vocab=vocab, max_len=32,
                              pairing="query_to_passage", overwrite=True)
  assert (q2p.anchor_type, q2p.context_type, q2p.rows_per_example) == ("query", "passage", 1)
  batch = _take(q2p, 0, 1)[0]
  assert batch["anchor_input_ids"].shape == (BATCH, 32)
  assert (batch["anchor_attention_mask"].sum(1) <= 8).all()  # queries are <= 6 ids + [CLS] [SEP]


# --- the data state beside the checkpoints -------------------------------------------------------------------


def test_resume_with_another_data_state_raises(tmp_path, task):
  from mote_jax.jobs.pretrain import PretrainStream, data_state
  from mote_jax.training.checkpointing import Checkpointer, DataStateMismatch
  streams = [PretrainStream(task=task, batch_size=BATCH)]
  checkpointer = Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False)
  try:
    checkpointer.check_data_state(data_state(streams, 0, 1))  # fresh run: recorded
    checkpointer.maybe_save(1, {"x": np.zeros(2, np.float32)}, force=True)
    checkpointer.wait()
    assert checkpointer.check_data_state(data_state(streams, 0, 1)) == []
    with pytest.raises(DataStateMismatch, match=r"process_count: 1 -> 2"):
      checkpointer.check_data_state(data_state(streams, 0, 2))
    with pytest.raises(DataStateMismatch, match=r"streams.test_online.spans.batch_size: 8 -> 16"):
      checkpointer.check_data_state(data_state([PretrainStream(task=task, batch_size=16)], 0, 1))
    with pytest.raises(DataStateMismatch, match=r"data_seed: 0 -> 1"):
      checkpointer.check_data_state(data_state(streams, 1, 1))
    changes = checkpointer.check_data_state(data_state(streams, 0, 2), allow_change=True)
    assert changes == [("process_count", 1, 2)]
    assert checkpointer.stored_data_state()["process_count"] == 2
    assert checkpointer.stored_data_state()["streams"]["test_online.spans"]["fingerprint"] == \
        task.source.fingerprint()
  finally:
    checkpointer.close()


# --- the pre-training job on a record stream -----------------------------------------------------------------


def _pretrain(model_dir, records_dir, *extra):
  import subprocess
  import sys
  from pathlib import Path
  command = [sys.executable, "-m", "mote_jax.launch", "--gin_file=runs/pretrain_tiny_smoke.gin",
             f"--gin.MODEL_DIR={model_dir}", "--gin.spans/PretrainStream.task=@recs/register_records_task()",
             "--gin.spans/PretrainStream.eval_split=None", "--gin.TrainerConfig.eval_every=0",
             "--gin.recs/register_records_task.name='test_online.job'",
             f"--gin.recs/register_records_task.directory='{records_dir}'",
             "--gin.recs/register_records_task.vocab=%VOCAB", "--gin.recs/register_records_task.max_len=%MAX_LEN",
             "--gin.TrainerConfig.checkpoint_every=2", "--gin.pretrain.export_hf=False", *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
def test_pretrain_job_on_records_checks_the_data_state_on_resume(tmp_path, records_dir):
  """The tiny recipe on a record stream: runs, resumes, and a resume with another batch size stops."""
  first = _pretrain(tmp_path, records_dir, "--gin.NUM_STEPS=2")
  assert first.returncode == 0, first.stderr[-3000:]
  stored = json.loads((tmp_path / "checkpoints" / "data_state.json").read_text())
  assert stored["streams"]["test_online.job"]["batch_size"] == 8 and stored["process_count"] == 1
  changed = _pretrain(tmp_path, records_dir, "--gin.NUM_STEPS=4", "--gin.spans/PretrainStream.batch_size=16")
  assert changed.returncode != 0
  assert "streams.test_online.job.batch_size: 8 -> 16" in changed.stderr
  allowed = _pretrain(tmp_path, records_dir, "--gin.NUM_STEPS=4", "--gin.spans/PretrainStream.batch_size=16",
                      "--gin.pretrain.allow_data_state_change=True")
  assert allowed.returncode == 0, allowed.stderr[-3000:]
  assert (tmp_path / "checkpoints" / "4").is_dir()
