"""Integration test with a REAL Triton server (the tritonserver binary of the nvidia-pytriton
wheel, unpacked by export.local_triton) on the CPU flavour of the model repository:
python-backend models that run the exported ONNX files with ONNX Runtime.

Checks: readiness and model states; 64 concurrent detector requests equal ONNX Runtime
run on the same ONNX files; the dynamic batcher merged them (statistics endpoint);
concurrent text-encoder requests of different token lengths (ragged batching inside the
python backend); malformed requests are refused and the server keeps serving; the
`caption` model decodes whole captions inside Triton (both ways of calling the graphs:
ONNX Runtime in its process, the cpu flavour's, and BLS requests to the caption_start /
caption_step models, the GPU flavours', on a second server), batching concurrent requests,
each caption equal to glipv2.captioning's beam search over ONNX Runtime.

Run with -s to see the measured numbers (startup time, requests vs executions).
Skips only when demo/tiny.pt is absent or the package index that serves nvidia-pytriton
is unreachable; anything else fails.
"""

from __future__ import annotations

import queue
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from export.local_triton import TritonDownloadError, TritonServer, batch_summary, install

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO_ROOT / "demo" / "tiny.pt"
MODELS = ("text_encoder", "detector", "vqa", "caption_start", "caption_step")
TOP_K = 100
MAX_BATCH = 8
N_CONCURRENT = 64
QUEUE_DELAY_S = 0.5
ATOL = 1e-4
# prompts of different token lengths (phrase lists joined with ". ")
PROMPTS = (
    ["red circle"],
    ["blue square", "green star"],
    ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon"],
    ["orange cross", "the largest circle", "a small blue square", "green star", "red hexagon",
     "yellow triangle", "white circle", "cyan cross"],
)

pytestmark = pytest.mark.timeout(900)


# --------------------------------------------------------------------------- helpers


def _tokens(prompts):
    from glipv2.text import Tokenizer, build_prompt, tokenize

    tok = Tokenizer()
    out = []
    for phrases in prompts:
        t = tokenize(tok, build_prompt(phrases))
        out.append((t.input_ids.astype(np.int64)[None], t.attention_mask.astype(np.int64)[None]))
    return out


def _images(n: int, hw: tuple[int, int], seed: int = 7) -> list[np.ndarray]:
    """n freshly drawn shapes-world scenes, letterboxed: uint8 [1, 3, H, W] each."""
    from glipv2.image import letterbox_batch
    from training import shapes_world as sw

    images = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        pixels, _ = letterbox_batch([sw.render(sw.sample_scene(rng), rng)], hw)
        images.append(np.ascontiguousarray(pixels, dtype=np.uint8))
    return images


def _input(name: str, array: np.ndarray, datatype: str | None = None):
    from tritonclient.utils import np_to_triton_dtype

    inp = grpcclient.InferInput(name, list(array.shape), datatype or np_to_triton_dtype(array.dtype))
    inp.set_data_from_numpy(array)
    return inp


def _infer_concurrently(url: str, model: str, requests: list[dict[str, np.ndarray]], outputs: list[str],
                        timeout_s: float = 300.0) -> list[dict[str, np.ndarray] | Exception]:
    """Send every request at once with gRPC async_infer; results in request order."""
    client = grpcclient.InferenceServerClient(url)
    done: queue.Queue = queue.Queue()

    def callback(i, result, error):
        done.put((i, result, error))

    try:
        for i, arrays in enumerate(requests):
            client.async_infer(model, [_input(k, v) for k, v in arrays.items()], partial(callback, i),
                               outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                               request_id=str(i), client_timeout=timeout_s)
        results: list = [None] * len(requests)
        deadline = time.monotonic() + timeout_s
        for _ in requests:
            i, result, error = done.get(timeout=max(1.0, deadline - time.monotonic()))
            results[i] = error if error is not None else {o: result.as_numpy(o) for o in outputs}
        return results
    finally:
        client.close()


def _stats_delta(before: dict, after: dict) -> dict:
    a, b = batch_summary(after), batch_summary(before)
    sizes = {s: c - b["batch_sizes"].get(s, 0) for s, c in a["batch_sizes"].items()}
    sizes = {s: c for s, c in sizes.items() if c}
    return {
        "requests": a["inference_count"] - b["inference_count"],
        "executions": a["execution_count"] - b["execution_count"],
        "batch_sizes": sizes,
        "batched_executions": sum(c for s, c in sizes.items() if s > 1),
    }


def _stats_after(srv, before: dict[str, dict], expect: dict[str, int], timeout: float = 10.0) -> dict[str, dict]:
    """_stats_delta per model of `before`, read again until each model of `expect` has
    counted at least that many requests (or the timeout): the statistics can trail the
    responses (one read under load gave the caption model 0 requests after all 8 came back)."""
    deadline = time.monotonic() + timeout
    while True:
        delta = {m: _stats_delta(b, srv.model_stats(m)) for m, b in before.items()}
        if all(delta[m]["requests"] >= n for m, n in expect.items()) or time.monotonic() > deadline:
            return delta
        time.sleep(0.05)


def _max_diff(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, f"shape {got.shape} != ORT's {want.shape}"
    assert got.dtype == want.dtype, f"dtype {got.dtype} != ORT's {want.dtype}"
    return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    if not CHECKPOINT.exists():
        pytest.skip(f"{CHECKPOINT.relative_to(REPO_ROOT)} is absent (make demo-model writes it)")
    from export.repository import BatchingSettings, render_repository

    out = tmp_path_factory.mktemp("triton") / "repo"
    t0 = time.perf_counter()
    # One preferred batch size (the max) and a long queue delay make the batch counts
    # deterministic: the batcher waits for 8 requests (or QUEUE_DELAY_S) before it runs.
    render_repository(checkpoint=CHECKPOINT, out=out, flavour="cpu", top_k=TOP_K, max_batch_size=MAX_BATCH,
                      settings=BatchingSettings(preferred_batch_sizes=[MAX_BATCH],
                                                max_queue_delay_us=int(QUEUE_DELAY_S * 1e6)))
    print(f"\n[triton] rendered the cpu repository from {CHECKPOINT.name} in {time.perf_counter() - t0:.1f} s")
    for m in MODELS:
        assert (out / m / "config.pbtxt").is_file(), f"{m}/config.pbtxt missing in {out}"
    return out


@pytest.fixture(scope="module")
def server(repository):
    try:
        root = install()
    except TritonDownloadError as e:
        pytest.skip(f"cannot get the tritonserver: package index unreachable: {e}")
    srv = TritonServer(repository, root=root)
    srv.start()
    try:
        took = srv.wait_ready(timeout=120)
        print(f"[triton] tritonserver ready in {took:.2f} s (HTTP {srv.url_http}, gRPC {srv.url_grpc})")
        yield srv
    finally:
        alive = srv.process is not None and srv.process.poll() is None
        tail = srv.log_tail(20)
        code = srv.stop()
        srv.cleanup()
        assert alive, f"tritonserver died during the tests (exit {code}):\n{tail}"


@pytest.fixture(scope="module")
def ort(repository):
    """glipv2.runtime.onnx.OrtEngine on the very ONNX files the repository serves."""
    from glipv2.runtime.onnx import OrtEngine

    links = Path(tempfile.mkdtemp(prefix="ort-"))
    for m in MODELS:
        files = sorted((repository / m).rglob("*.onnx"))
        assert len(files) == 1, f"expected one ONNX file under {repository / m}, found {files}"
        (links / f"{m}.onnx").symlink_to(files[0].resolve())
    return OrtEngine(links, threads=1)


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.url_grpc)
    yield c
    c.close()


@pytest.fixture(scope="module")
def image_hw(client) -> tuple[int, int]:
    meta = client.get_model_metadata("detector", as_json=True)
    shape = next(i["shape"] for i in meta["inputs"] if i["name"] == "images")
    return int(shape[-2]), int(shape[-1])


@pytest.fixture(scope="module")
def features(server, ort):
    """Token features from the served text encoder, one entry per prompt:
    (input_ids, attention_mask, token_features), checked against ORT."""
    out = []
    for ids, mask in _tokens(PROMPTS):
        res = _infer_concurrently(server.url_grpc, "text_encoder", [{"input_ids": ids, "attention_mask": mask}],
                                  ["token_features"])[0]
        assert not isinstance(res, Exception), res
        feats = res["token_features"]
        assert _max_diff(feats, ort.encode_text(ids, mask)) <= ATOL
        out.append((ids, mask, feats))
    return out


@pytest.fixture(scope="module")
def detector_burst(server, features, image_hw):
    """N_CONCURRENT detector requests at once (own image each, prompts of different
    lengths in turn); returns (requests, results, stats delta, seconds)."""
    images = _images(N_CONCURRENT, image_hw)
    requests = []
    for i, img in enumerate(images):
        _, mask, feats = features[i % len(features)]
        requests.append({"images": img, "token_features": feats, "attention_mask": mask})
    before = server.model_stats("detector")
    t0 = time.perf_counter()
    results = _infer_concurrently(server.url_grpc, "detector", requests, ["boxes", "logits", "centerness"])
    took = time.perf_counter() - t0
    delta = _stats_after(server, {"detector": before}, {"detector": N_CONCURRENT})["detector"]
    print(f"[triton] detector: {N_CONCURRENT} concurrent requests -> {delta['executions']} executions "
          f"(server counted {delta['requests']} inferences), batch sizes {delta['batch_sizes']} "
          f"(size: executions), {took:.2f} s wall")
    return requests, results, delta


# --------------------------------------------------------------------------- tests


def test_server_ready_and_models_loaded(server, client):
    assert server.is_ready()
    assert client.is_server_live() and client.is_server_ready()
    index = {m["name"]: m for m in server.repository_index()}
    for m in MODELS:
        assert index.get(m, {}).get("state") == "READY", f"{m}: {index.get(m)}"
        assert client.is_model_ready(m)
        cfg = client.get_model_config(m, as_json=True)["config"]
        assert cfg["backend"] == "python", cfg
        assert int(cfg["max_batch_size"]) == MAX_BATCH * (5 if m == "caption_step" else 1)  # steps carry beams
        assert "dynamic_batching" in cfg


def test_concurrent_detector_requests_equal_onnxruntime(detector_burst, ort):
    requests, results, _ = detector_burst
    failed = [(i, r) for i, r in enumerate(results) if isinstance(r, Exception)]
    assert not failed, f"{len(failed)}/{len(results)} requests failed, first: {failed[0]}"
    worst = {"boxes": 0.0, "logits": 0.0, "centerness": 0.0}
    for req, res in zip(requests, results):
        want = dict(zip(("boxes", "logits", "centerness"),
                        ort.detect(req["images"], req["token_features"], req["attention_mask"])))
        for name in worst:
            worst[name] = max(worst[name], _max_diff(res[name], want[name]))
    print(f"[triton] detector vs ONNX Runtime, max abs diff over {len(results)} requests: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert max(worst.values()) <= ATOL, worst
    # not a vacuous match: a python backend that reads its inputs wrongly (numpy 2 under the
    # 24.10 stub reads zeros) would still be compared against ORT on the real inputs, but
    # make sure the outputs carry information as well
    boxes = np.stack([r["boxes"][0] for r in results])
    assert len({b.tobytes() for b in boxes}) == len(results), "different images gave identical boxes"
    assert all(np.ptp(r["logits"]) > 0 and np.ptp(r["centerness"]) > 0 for r in results)


def test_dynamic_batcher_formed_batches(detector_burst, server):
    _, _, delta = detector_burst
    # 64 requests sent at once run as 8 full batches (prompts of 4 token lengths among them).
    assert delta["requests"] == N_CONCURRENT, delta
    assert delta["executions"] == N_CONCURRENT // MAX_BATCH, delta
    assert delta["batch_sizes"] == {MAX_BATCH: N_CONCURRENT // MAX_BATCH}, delta
    total = batch_summary(server.model_stats("detector"))
    print(f"[triton] detector totals since start: {total['inference_count']} inferences in "
          f"{total['execution_count']} executions")


def test_text_encoder_ragged_concurrent(server, ort):
    tokens = _tokens(PROMPTS) * 4  # 16 requests, 4 different token lengths, interleaved
    lengths = sorted({ids.shape[1] for ids, _ in tokens})
    assert len(lengths) == len(PROMPTS), lengths
    before = server.model_stats("text_encoder")
    results = _infer_concurrently(server.url_grpc, "text_encoder",
                                  [{"input_ids": ids, "attention_mask": mask} for ids, mask in tokens],
                                  ["token_features"])
    delta = _stats_after(server, {"text_encoder": before}, {"text_encoder": len(tokens)})["text_encoder"]
    failed = [(i, r) for i, r in enumerate(results) if isinstance(r, Exception)]
    assert not failed, f"{len(failed)}/{len(results)} requests failed, first: {failed[0]}"
    worst = max(_max_diff(r["token_features"], ort.encode_text(ids, mask)) for r, (ids, mask) in zip(results, tokens))
    print(f"[triton] text_encoder: {len(tokens)} concurrent requests with token lengths {lengths} -> "
          f"{delta['executions']} executions, batch sizes {delta['batch_sizes']}; max abs diff vs ORT {worst:.2e}")
    assert delta["requests"] == len(tokens), delta
    # Ragged batching: 16 prompts of 4 token lengths run as 2 batches of 8 (without it each
    # batch would hold one length: at least 4 executions).
    assert delta["executions"] == 2 and delta["batch_sizes"] == {MAX_BATCH: 2}, delta
    assert worst <= ATOL


def test_malformed_requests_are_refused_and_server_keeps_serving(server, client, features, image_hw):
    ids, mask, feats = features[1]
    img = _images(1, image_hw, seed=99)[0]
    good = {"images": img, "token_features": feats, "attention_mask": mask}
    bad_requests = {
        "wrong dtype (images as FP32)": {**good, "images": img.astype(np.float32)},
        "missing input (no attention_mask)": {k: v for k, v in good.items() if k != "attention_mask"},
        "token length mismatch (mask shorter than features)": {**good, "attention_mask": mask[:, :-1]},
    }
    for what, arrays in bad_requests.items():
        with pytest.raises(InferenceServerException) as err:
            client.infer("detector", [_input(k, v) for k, v in arrays.items()], client_timeout=120)
        print(f"[triton] {what}: refused: {str(err.value).splitlines()[0][:160]}")
    assert server.process is not None and server.process.poll() is None, server.log_tail()
    assert client.is_server_ready() and client.is_model_ready("detector")
    res = client.infer("detector", [_input(k, v) for k, v in good.items()], client_timeout=120)
    assert res.as_numpy("boxes").shape == (1, TOP_K, 4)
    assert res.as_numpy("logits").shape == (1, TOP_K, feats.shape[1])


def _infer(client, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    result = client.infer(model, [_input(k, v) for k, v in inputs.items()],
                          outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
    return [result.as_numpy(o) for o in outputs]


def test_vqa_and_caption_graphs_equal_onnxruntime(server, client, ort):
    """The understanding graphs through the real server (python backend, cpu flavour):
    concurrent VQA requests with questions of different lengths, and a caption start +
    two lockstep steps, each equal to ONNX Runtime on the same files."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    questions = _tokens([["what color is the star?"], ["how many circles are there?", "is there a red square"]])
    images = rng.integers(0, 256, (4, 3, 256, 256), dtype=np.uint8)

    def vqa(i):
        ids, mask = questions[i % 2]
        feats = ort.encode_text(ids, mask)
        inputs = {"images": images[i:i + 1], "token_features": feats, "attention_mask": mask}
        got = _infer(client, "vqa", inputs, ["answer_logits"])[0]
        return np.abs(got - ort.vqa(images[i:i + 1], feats, mask)).max()

    with ThreadPoolExecutor(4) as pool:
        assert max(pool.map(vqa, range(4))) <= ATOL

    start = _infer(client, "caption_start", {"images": images[:3]},
                   ["logprobs", "present_k", "present_v", "cross_k", "cross_v"])
    ref = ort.captioner.start(images[:3])
    for a, b in zip(start, ref):
        assert np.abs(a - b).max() <= ATOL
    past_k, past_v, cross_k, cross_v = ref[1], ref[2], ref[3], ref[4]
    tokens = ref[0].argmax(1)
    for _ in range(2):
        got = _infer(client, "caption_step", {"tokens": tokens.reshape(-1, 1).astype(np.int64), "past_k": past_k,
                                              "past_v": past_v, "cross_k": cross_k, "cross_v": cross_v},
                     ["logprobs", "present_k", "present_v"])
        want = ort.captioner.step(tokens, past_k, past_v, cross_k, cross_v)
        for a, b in zip(got, want):
            assert a.shape == b.shape and np.abs(a - b).max() <= ATOL
        _, past_k, past_v = want
        tokens = want[0].argmax(1)


# --------------------------------------------------------------------------- the caption loop model

CAPTION_GRAPHS = ("caption", "caption_start", "caption_step")


def _bls_words(words: tuple[str, ...]) -> tuple[str, ...]:
    """The second server's caption words: the model's without "red", so its loop must read
    the `words` parameter to give the captions the reference gives (no "red ...")."""
    return tuple(w for w in words if w != "red")


@pytest.fixture(scope="module")
def bls_server(repository, tmp_path_factory):
    """A second server with only the caption models, the loop calling the graphs through
    BLS as in the GPU flavours (its config's `graphs` parameter switched to "triton"), and
    other caption words (_bls_words)."""
    import shutil

    from glipv2.runtime.manifest import Manifest

    out = tmp_path_factory.mktemp("triton-bls") / "repo"
    for m in CAPTION_GRAPHS:
        shutil.copytree(repository / m, out / m)
    config = out / "caption" / "config.pbtxt"
    text = config.read_text()
    assert 'key: "graphs" value: { string_value: "onnxruntime" }' in text
    words = Manifest.load(repository).caption.words
    old = f'key: "words" value: {{ string_value: "{" ".join(words)}" }}'
    assert words and old in text
    text = text.replace(old, f'key: "words" value: {{ string_value: "{" ".join(_bls_words(words))}" }}')
    config.write_text(text.replace('string_value: "onnxruntime"', 'string_value: "triton"'))
    srv = TritonServer(out, root=install())
    srv.start()
    try:
        srv.wait_ready(timeout=120)
        yield srv
    finally:
        srv.stop()
        srv.cleanup()


@pytest.mark.parametrize("graphs", ["onnxruntime", "triton"])
def test_caption_model_decodes_inside_triton_in_batches(graphs, request, repository, ort, image_hw):
    """8 single-image requests at once run as ONE execution of the caption model (its
    dynamic batcher, preferred batch 8); every caption equals beam_search over ONNX Runtime;
    the graphs are called in-process (onnxruntime: caption_step never sees a request) or
    through Triton (BLS: caption_step runs inside the server, no network in between)."""
    from glipv2.captioning import MentionRules, beam_search
    from glipv2.phrases import ends_on_phrase, repeated_mention
    from glipv2.runtime.manifest import Manifest
    from glipv2.text import Tokenizer
    from glipv2.understanding import caption_pieces

    srv = request.getfixturevalue("server" if graphs == "onnxruntime" else "bls_server")
    images = _images(MAX_BATCH, image_hw, seed=21)
    limits = [20, 20, 20, 20, 20, 20, 4, 20]
    beam = 1 if graphs == "onnxruntime" else 2
    requests = [{"images": img, "beam_size": np.array([[beam]], np.int32), "max_len": np.array([[n]], np.int32)}
                for img, n in zip(images, limits)]
    before = {m: srv.model_stats(m) for m in CAPTION_GRAPHS}
    t0 = time.perf_counter()
    results = _infer_concurrently(srv.url_grpc, "caption", requests, ["tokens", "num_tokens", "logprob"])
    took = time.perf_counter() - t0
    counted = {"caption": MAX_BATCH} if graphs == "onnxruntime" else {"caption": MAX_BATCH, "caption_start": MAX_BATCH}
    delta = _stats_after(srv, before, counted)
    failed = [r for r in results if isinstance(r, Exception)]
    assert not failed, failed[0]
    print(f"[triton] caption ({graphs}): {len(requests)} concurrent requests -> {delta['caption']['executions']} "
          f"executions in {took:.2f} s; caption_step executions {delta['caption_step']['executions']}")
    assert delta["caption"]["requests"] == MAX_BATCH and delta["caption"]["executions"] == 1, delta
    if graphs == "onnxruntime":
        assert delta["caption_start"]["requests"] == delta["caption_step"]["requests"] == 0, delta
    else:  # one start for the batch, then lockstep steps of every beam of every image
        assert delta["caption_start"]["requests"] == MAX_BATCH and delta["caption_start"]["executions"] == 1, delta
        assert delta["caption_step"]["executions"] >= 3 and max(delta["caption_step"]["batch_sizes"]) > MAX_BATCH
    caption = Manifest.load(repository).caption
    end = list(caption.tokens).index(caption.end_id)
    # the caption model decodes under the same rules as the embedded backend's
    # CaptionPipeline, with the caption words of its config
    pieces = caption_pieces(Tokenizer(), caption.tokens)
    words = caption.words if graphs == "onnxruntime" else _bls_words(caption.words)
    rules = MentionRules(pieces, repeated_mention, ends_on_phrase, words)
    wanted = []
    for img, n, got in zip(images, limits, results):
        (want,) = beam_search(ort.captioner, img, end, beam, n, rules=rules)
        k = int(got["num_tokens"][0, 0])
        assert got["tokens"][0, :k].tolist() == want.tokens and k <= n
        assert abs(float(got["logprob"][0, 0]) - want.logprob) < 1e-4
        wanted.append(want.tokens)
    if words != caption.words:  # the other words change some of these captions
        model_words = MentionRules(pieces, repeated_mention, ends_on_phrase, caption.words)
        assert any(w != beam_search(ort.captioner, img, end, beam, n, rules=model_words)[0].tokens
                   for w, img, n in zip(wanted, images, limits))
    assert len({tuple(r["tokens"][0].tolist()) for r in results}) > 4  # captions of different scenes differ


def test_caption_model_checks_each_request_by_its_found_flags(server, repository, ort, image_hw):
    """Requests with and without `found` share one execution; each image decodes with its
    own flags (glipv2.captioning.CheckedRules), equal to beam_search over ONNX Runtime with
    the same rules, and flags that rule out phrases change the caption."""
    from glipv2.captioning import MentionRules, PhraseCheck, beam_search
    from glipv2.phrases import ends_on_phrase, repeated_mention
    from glipv2.runtime.manifest import Manifest
    from glipv2.text import Tokenizer
    from glipv2.understanding import caption_pieces

    caption = Manifest.load(repository).caption
    check = PhraseCheck(caption.checked_phrases)
    assert len(check) == 36
    end = list(caption.tokens).index(caption.end_id)
    rules = MentionRules(caption_pieces(Tokenizer(), caption.tokens), repeated_mention, ends_on_phrase, caption.words)
    images = _images(4, image_hw, seed=31)
    rng = np.random.default_rng(5)
    flags = [None, np.zeros(36, np.uint8), rng.integers(0, 2, 36).astype(np.uint8), np.ones(36, np.uint8)]
    requests = [{"images": img, "beam_size": np.array([[2]], np.int32), "max_len": np.array([[39]], np.int32),
                 **({} if f is None else {"found": f[None]})} for img, f in zip(images, flags)]
    before = {"caption": server.model_stats("caption")}
    results = _infer_concurrently(server.url_grpc, "caption", requests, ["tokens", "num_tokens"])
    assert not [r for r in results if isinstance(r, Exception)], results
    changed = 0
    for img, f, got in zip(images, flags, results):
        row_rules = rules if f is None else check.rules_per_image(rules, f[None])
        (want,) = beam_search(ort.captioner, img, end, 2, 39, rules=row_rules)
        k = int(got["num_tokens"][0, 0])
        assert got["tokens"][0, :k].tolist() == want.tokens
        if f is not None:
            changed += want.tokens != beam_search(ort.captioner, img, end, 2, 39, rules=rules)[0].tokens
            assert f.all() or changed, "flags that rule out phrases must change the caption"
    assert changed == 2  # all zeros and the random flags; all ones is the unchecked caption
    delta = _stats_after(server, before, {"caption": 4})
    assert delta["caption"]["executions"] < 4, delta  # checked and unchecked requests batch together
    bad = _infer_concurrently(server.url_grpc, "caption", [{**requests[0], "found": np.full((1, 36), 2, np.uint8)}],
                              ["tokens"])[0]
    assert isinstance(bad, InferenceServerException) and "found must be 0 or 1" in str(bad)


def test_caption_model_refuses_bad_requests(server):
    img = _images(1, (256, 256), seed=3)[0]
    bad = [{"images": img, "beam_size": np.array([[9]], np.int32), "max_len": np.array([[5]], np.int32)},
           {"images": img, "beam_size": np.array([[1]], np.int32), "max_len": np.array([[400]], np.int32)}]
    results = _infer_concurrently(server.url_grpc, "caption", bad, ["tokens"])
    assert all(isinstance(r, InferenceServerException) for r in results), results
    assert "beam_size must be in 1..5" in str(results[0]) and "max_len must be in 1..39" in str(results[1])
    ok = _infer_concurrently(server.url_grpc, "caption", [{**bad[0], "beam_size": np.array([[1]], np.int32)}],
                             ["num_tokens"])[0]
    assert not isinstance(ok, Exception) and 1 <= int(ok["num_tokens"][0, 0]) <= 5
