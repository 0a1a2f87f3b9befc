"""CUDA graphs of the text encoders' forwards (serve_app/scoring/graphs.py).

On the CPU: the capturable forward (a 4D additive mask) scores what the plain one scores and makes no host
sync (a graph could not record one, and would bake in the value it read); a model that reads the 4D mask
otherwise is refused. On a CUDA card (skipped elsewhere): the graphed scorer equals the eager one.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from serve_app.scoring.family import LoadOptions
from serve_app.scoring.graphs import GraphedForward, capturable_mask, disagreement, with_padding
from serve_app.scoring.loading import load_scorer
from serve_app.scoring.types import Content, Pair

# The aten ops by which Python reads a tensor's value on the host (item(), bool(), nonzero's size): a sync.
HOST_SYNCS = {"_local_scalar_dense", "is_nonzero", "nonzero", "item", "equal"}

QUERIES = ["what is the capital of france", "largest river"]
DOCUMENTS = ["paris", "the dog is big and brown and it runs", "a red car " * 6, "python code " * 12]


def mixed_pairs() -> list[Pair]:
    return [Pair(Content(q), Content(d)) for q in QUERIES for d in DOCUMENTS]


class SyncProbe(TorchDispatchMode):
    """Records every host sync of the code run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in HOST_SYNCS:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def test_the_probe_sees_a_host_sync():
    # What the transformers mask code does with a 2D mask (mask.all() to drop it): the probe must see it.
    with torch.inference_mode(), SyncProbe() as probe:
        bool(torch.ones(3).all())
    assert probe.syncs


@pytest.mark.parametrize("family", ["cross_encoder", "cross_encoder_2", "embedding"])
def test_the_capturable_forward_scores_like_the_plain_one_with_no_host_sync(model_dirs, family):
    # Shaped as on a GPU, in one forward: rows of several lengths padded to a bucket.
    scorer = load_scorer(str(model_dirs[family]), LoadOptions(shape_buckets=True, forward_cost_tokens=1 << 20))
    forward = scorer.pooled if family == "embedding" else scorer.raw_scores
    groups = scorer.prepare(mixed_pairs())
    groups = groups.groups if family == "embedding" else groups[1]
    assert any(int(batch["attention_mask"].min()) == 0 for _, batch in groups), "no group has padding"
    for _, batch in groups:
        with torch.inference_mode():
            plain = forward(batch, False)
            with SyncProbe() as probe:
                capturable = forward(batch, True)
        assert probe.syncs == []
        torch.testing.assert_close(capturable, plain, atol=1e-6, rtol=1e-6)


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
# Encoder families of public rerankers: ms-marco MiniLM and bge-reranker-base (BERT / XLM-R), bge-reranker-v2-m3
# (XLM-R), ELECTRA and DistilBERT cross-encoders, ModernBERT (gte-reranker-modernbert).
ENCODERS = {
    "bert": lambda: transformers.BertConfig(**SMALL),
    "roberta": lambda: transformers.RobertaConfig(**SMALL, pad_token_id=1),
    "xlm-roberta": lambda: transformers.XLMRobertaConfig(**SMALL, pad_token_id=1),
    "electra": lambda: transformers.ElectraConfig(**SMALL, embedding_size=32),
    "distilbert": lambda: transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100),
    "modernbert": lambda: transformers.ModernBertConfig(
        **SMALL, pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3
    ),  # fmt: skip
}


def padded_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 9:] = 0
    return {"input_ids": torch.randint(4, 100, (4, 16), generator=generator), "attention_mask": mask}


def sequence_classifier(config, attention: str):
    config.num_labels = 1
    config._attn_implementation = attention
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", sorted(ENCODERS))
def test_public_encoder_architectures_take_the_capturable_mask(architecture, attention):
    model = sequence_classifier(ENCODERS[architecture](), attention)
    batch = padded_batch()
    with torch.inference_mode():
        plain = model(**batch).logits
        with SyncProbe() as probe:
            capturable = model(**{**batch, "attention_mask": capturable_mask(batch["attention_mask"], model.dtype)})
    assert probe.syncs == []
    torch.testing.assert_close(capturable.logits, plain, atol=1e-5, rtol=1e-5)


def test_a_model_that_reads_the_4d_mask_otherwise_is_refused():
    # DeBERTa-v2 (mxbai-rerank-base-v1's class) takes any mask for 0/1: the capturable forward scores NaN.
    config = transformers.DebertaV2Config(**SMALL)
    model = sequence_classifier(config, "eager")

    def forward(batch, capturable):
        if capturable:
            batch = {**batch, "attention_mask": capturable_mask(batch["attention_mask"], model.dtype)}
        return model(**batch).logits[:, 0]

    batch = padded_batch()
    with torch.inference_mode():
        reason = disagreement(lambda b: forward(b, True), lambda b: forward(b, False), batch, 1e-4)
        bert = sequence_classifier(ENCODERS["bert"](), "sdpa")
        same = disagreement(
            lambda b: bert(**{**b, "attention_mask": capturable_mask(b["attention_mask"], bert.dtype)}).logits,
            lambda b: bert(**b).logits,
            batch,
            1e-4,
        )
    assert reason is not None and "differs" in reason
    assert same is None


def test_the_capture_check_pads_a_batch_that_has_no_padding():
    batch = {"input_ids": torch.arange(12).view(2, 6), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    checked = with_padding(batch)
    assert checked["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert checked["attention_mask"][1].tolist() == [1] * 6
    assert batch["attention_mask"].min() == 1  # the caller's batch is left as it was


def test_cuda_graphs_on_the_cpu_leave_the_forward_as_it_is(model_dirs):
    scorer = load_scorer(str(model_dirs["cross_encoder"]), LoadOptions(cuda_graphs=True))
    plain = load_scorer(str(model_dirs["cross_encoder"]))
    assert scorer.graphs is None
    assert scorer.options.describe()["cuda_graphs"] is True
    assert scorer.score(mixed_pairs()) == plain.score(mixed_pairs())


# ---- the bookkeeping, on the CPU, with a stand-in for the CUDA recorder -----------------------------------


class StandInRecorder:
    """Records as a CUDA graph does, as far as the caller can tell: one static output, overwritten in place by
    each replay from whatever the static inputs then hold."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.recorded = fail, 0

    def record(self, forward, inputs):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.recorded += 1
        output = forward(inputs)

        def replay() -> None:
            output.copy_(forward(inputs))

        return replay, output


def graphed_scorer(model_dirs, family: str, recorder, tolerance: float = 1e-5, **options):
    scorer = load_scorer(str(model_dirs[family]), LoadOptions(shape_buckets=True, **options))
    forward = scorer.pooled if family == "embedding" else scorer.raw_scores
    scorer.graphs = GraphedForward(
        lambda b: forward(b, True), lambda b: forward(b, False), "cpu", tolerance, recorder=recorder
    )
    return scorer


@pytest.mark.parametrize("family", ["cross_encoder", "embedding"])
def test_each_shape_is_recorded_once_then_replayed_and_scores_like_the_eager_forward(model_dirs, family):
    recorder = StandInRecorder()
    scorer = graphed_scorer(model_dirs, family, recorder)
    plain = load_scorer(str(model_dirs[family]), LoadOptions(shape_buckets=True))
    expected = plain.score(mixed_pairs())
    prepared = scorer.prepare(mixed_pairs())
    groups = prepared.groups if family == "embedding" else prepared[1]
    shapes = {tuple(batch["input_ids"].shape) for _, batch in groups}
    assert len(groups) > 1  # several forwards in a call: each result must survive the next replay
    for _ in range(2):
        assert scorer.score(mixed_pairs()) == pytest.approx(expected, abs=1e-5)
    state = scorer.graphs.describe()
    assert recorder.recorded == state["graphs"] == len(shapes)
    assert state["replays"] == 2 * len(groups) and state["eager"] == 0 and state["failed"] is None


def test_a_result_survives_the_next_replay_of_its_shape(model_dirs):
    # Forwards of 4 texts of one bucket each: one shape, replayed several times in one call. The embeddings of a
    # forward are kept while the next one runs, so a result must not be the graph's output itself.
    pairs = [Pair(Content("query"), Content(f"document number {i} about rivers")) for i in range(8)]
    scorer = graphed_scorer(model_dirs, "embedding", StandInRecorder(), max_tokens_per_forward=64)
    shapes = [tuple(batch["input_ids"].shape) for _, batch in scorer.prepare(pairs).groups]
    assert max(shapes.count(shape) for shape in shapes) >= 3
    plain = load_scorer(str(model_dirs["embedding"]), LoadOptions(shape_buckets=True, max_tokens_per_forward=64))
    assert scorer.score(pairs) == pytest.approx(plain.score(pairs), abs=1e-5)
    assert scorer.graphs.describe()["graphs"] == len(set(shapes))


def test_past_max_graphs_a_new_shape_runs_eagerly(model_dirs):
    scorer = graphed_scorer(model_dirs, "cross_encoder", StandInRecorder())
    scorer.graphs.max_graphs = 1
    expected = load_scorer(str(model_dirs["cross_encoder"]), LoadOptions(shape_buckets=True)).score(mixed_pairs())
    assert scorer.score(mixed_pairs()) == pytest.approx(expected, abs=1e-5)
    state = scorer.graphs.describe()
    assert state["graphs"] == 1 and state["eager"] >= 1 and state["failed"] is None


def test_a_capture_that_fails_turns_graphs_off_and_the_scores_stay_right(model_dirs):
    scorer = graphed_scorer(model_dirs, "embedding", StandInRecorder(fail=True))
    expected = load_scorer(str(model_dirs["embedding"]), LoadOptions(shape_buckets=True)).score(mixed_pairs())
    assert scorer.score(mixed_pairs()) == pytest.approx(expected, abs=1e-5)
    assert "capture failed: RuntimeError" in scorer.graphs.failed
    assert scorer.graphs.describe()["graphs"] == 0


def test_a_capturable_forward_that_scores_otherwise_is_never_replayed(model_dirs):
    scorer = load_scorer(str(model_dirs["cross_encoder"]), LoadOptions(shape_buckets=True))
    recorder = StandInRecorder()
    scorer.graphs = GraphedForward(
        lambda b: scorer.raw_scores(b, True) + 1.0,
        lambda b: scorer.raw_scores(b, False),
        "cpu",
        1e-5,
        recorder=recorder,
    )
    expected = load_scorer(str(model_dirs["cross_encoder"]), LoadOptions(shape_buckets=True)).score(mixed_pairs())
    assert scorer.score(mixed_pairs()) == pytest.approx(expected, abs=1e-5)
    assert "the capturable forward: it differs" in scorer.graphs.failed
    assert recorder.recorded == 0 and scorer.graphs.describe()["replays"] == 0


def token_sum(batch):
    """A toy forward: each row's sum of its kept ids (reads every input byte, as a model does)."""
    return (batch["input_ids"] * batch["attention_mask"]).sum(1).float()


def toy_batch(rows: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[0, width // 2 :] = 0
    return {"input_ids": torch.randint(0, 1000, (rows, width), generator=generator), "attention_mask": mask}


def test_the_graphs_share_their_input_buffers_and_each_replay_reads_its_own_batch():
    recorder = StandInRecorder()
    graphs = GraphedForward(token_sum, token_sum, "cpu", 1e-6, recorder=recorder)
    # As the warm-up meets them: length buckets of 16 and power-of-two rows, growing.
    shapes = [(rows, width) for width in range(16, 129, 16) for rows in (1, 2, 4, 8, 16, 32, 64)]
    for i, shape in enumerate(shapes):
        graphs(toy_batch(*shape, seed=i))
    assert recorder.recorded == len(shapes)
    # One buffer per input name, grown by doubling: about the largest shape's bytes, not the sum of all.
    largest = 64 * 128 * 8 * 2  # int64 ids and mask
    every_shape = sum(rows * width * 8 * 2 for rows, width in shapes)  # a buffer of its own per graph
    assert graphs.arena.bytes <= 4 * largest and graphs.arena.bytes < every_shape / 4
    storages = {entry[1]["input_ids"].untyped_storage().data_ptr() for entry in graphs.graphs.values()}
    assert len(storages) < len(shapes) / 2
    # Shapes replayed out of order, each after another shape overwrote the shared bytes: each reads its own batch.
    for i, shape in enumerate(reversed(shapes * 2)):
        batch = toy_batch(*shape, seed=100 + i)
        torch.testing.assert_close(graphs(batch), token_sum(batch))
    assert graphs.describe()["replays"] == 3 * len(shapes) and graphs.describe()["eager"] == 0  # the first call too
    assert graphs.describe()["input_mib"] == round(graphs.arena.bytes / 2**20, 2)


def test_an_input_of_another_dtype_gets_a_buffer_of_its_own():
    graphs = GraphedForward(token_sum, token_sum, "cpu", 1e-6, recorder=StandInRecorder())
    wide = toy_batch(4, 16, seed=1)
    narrow = {name: value.to(torch.int32) for name, value in toy_batch(2, 16, seed=2).items()}
    for batch in (wide, narrow, wide, narrow):
        torch.testing.assert_close(graphs(batch), token_sum(batch))
    assert {entry[1]["input_ids"].dtype for entry in graphs.graphs.values()} == {torch.int64, torch.int32}


# ---- on a CUDA card --------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["cross_encoder", "embedding"])
def test_the_graphed_scorer_scores_like_the_eager_one(model_dirs, family, dtype):
    options = dict(device="cuda:0", dtype=dtype, shape_buckets=True)
    eager = load_scorer(str(model_dirs[family]), LoadOptions(**options))
    graphed = load_scorer(str(model_dirs[family]), LoadOptions(**options, cuda_graphs=True))
    expected = eager.score(mixed_pairs())
    for _ in range(2):  # first: captured; then: replayed
        got = graphed.score(mixed_pairs())
        assert got == pytest.approx(expected, abs=1e-5 if dtype == torch.float32 else 3e-2)
    state = graphed.graphs.describe()
    assert state["failed"] is None and state["graphs"] >= 1 and state["replays"] >= 2 * state["graphs"]
    assert state["eager"] == 0


@cuda
def test_a_graph_that_differs_from_the_eager_forward_is_turned_off():
    model = torch.nn.Linear(4, 1).cuda()

    def forward(batch, capturable):
        out = model(batch["input_ids"].float())[:, 0]
        return out + 1 if capturable else out  # a capturable forward that scores otherwise

    graphs = GraphedForward(lambda b: forward(b, True), lambda b: forward(b, False), "cuda:0", 1e-4)
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    with torch.inference_mode():
        out = graphs(batch)
        torch.testing.assert_close(out, forward({k: v.cuda() for k, v in batch.items()}, False))
    assert graphs.failed is not None and "differs" in graphs.failed
    assert graphs.describe()["graphs"] == 0 and graphs.describe()["eager"] == 1
