"""The query encoder saved with an index: Engine.load restores it and search takes raw
query features; a damaged or mismatched encoder file is refused with a named error."""

import json

import numpy as np
import pytest
import torch

from sparcode.engine import CodeIndex, Engine
from sparcode.engine.encoder import PerTokenQuantizer, ProductQuantizer, QueryEncoder, ResidualQuantizer, Tokenizer
from sparcode.engine.synthetic import random_index

N_ITEMS, HISTORY = 50, 6


def make_encoder(n_words: int = 4, seed: int = 0, quantizer: type = ProductQuantizer) -> QueryEncoder:
    torch.manual_seed(seed)
    tokenizer = Tokenizer(N_ITEMS, [3, 5], dim=8, n_tokens=3, hidden=(16,))
    return QueryEncoder(tokenizer, quantizer(8, n_sub=2, n_words=n_words), history=HISTORY).eval()


def features(batch: int, seed: int = 1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    history = rng.integers(-1, N_ITEMS, size=(batch, HISTORY))
    user = np.stack([rng.integers(0, 3, batch), rng.integers(0, 5, batch)], 1)
    return torch.from_numpy(np.concatenate([history, user], 1)).float()


@pytest.fixture
def saved(tmp_path):
    encoder = make_encoder()
    index = random_index(16, N_ITEMS, 10, seed=0)
    path = tmp_path / "index"
    index.save(path, encoder=encoder)
    return path, encoder


def test_engine_load_restores_the_encoder_and_search_takes_features(saved):
    path, encoder = saved
    engine = Engine.load(path, device="cpu", backend="torch")
    assert engine.encoder is not None and engine.encoder.config() == encoder.config()
    feats = features(20)
    codes = encoder(feats)
    assert codes.shape == (20, 3) and int(codes.max()) < 16
    torch.testing.assert_close(engine.encoder(feats), codes)  # same weights, same codes
    by_features = engine.search(feats, k=5)
    by_codes = engine.search(codes, k=5)
    assert torch.equal(by_features.ids, by_codes.ids) and torch.equal(by_features.scores, by_codes.scores)
    history, user = feats[:, :HISTORY].long(), feats[:, HISTORY:].long()
    assert torch.equal(encoder.encode(history, user), codes)


def test_residual_encoder_round_trips(tmp_path):
    encoder = make_encoder(quantizer=ResidualQuantizer)
    random_index(16, N_ITEMS, 10, seed=0).save(tmp_path / "rq", encoder=encoder)
    manifest = json.loads((tmp_path / "rq" / "manifest.json").read_text())
    assert manifest["encoder"]["quantizer"] == "residual"
    loaded = Engine.load(tmp_path / "rq", device="cpu").encoder
    assert isinstance(loaded.quantizer, ResidualQuantizer)
    torch.testing.assert_close(loaded.quantizer.codebooks, encoder.quantizer.codebooks)
    feats = features(30)
    assert torch.equal(loaded(feats), encoder(feats))


def test_per_token_encoder_round_trips_with_its_codebooks(tmp_path):
    torch.manual_seed(0)
    tokenizer = Tokenizer(N_ITEMS, [3, 5], dim=8, n_tokens=3, hidden=(16,))
    encoder = QueryEncoder(tokenizer, PerTokenQuantizer("residual", 3, 8, n_sub=2, n_words=4, feedback=True),
                           history=HISTORY).eval()
    plain = random_index(48, N_ITEMS, 10, seed=0)
    index = CodeIndex.from_postings(plain.indptr, plain.items, plain.scores, N_ITEMS,  # export stores (T, P, C, d)
                                    codebooks=encoder.quantizer.codebooks.clone())
    index.save(tmp_path / "tok", encoder=encoder)
    manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert manifest["encoder"]["per_token"] is True and manifest["codebooks"] == [3, 2, 4, 8]
    assert manifest["encoder"]["feedback"] is True
    engine = Engine.load(tmp_path / "tok", device="cpu")
    assert isinstance(engine.encoder.quantizer, PerTokenQuantizer) and engine.encoder.quantizer.feedback
    torch.testing.assert_close(engine.index.codebooks, encoder.quantizer.codebooks)
    feats = features(30)
    codes = engine.encoder(feats)
    assert torch.equal(codes, encoder(feats))
    assert bool(((codes >= torch.arange(3) * 16) & (codes < torch.arange(1, 4) * 16)).all())  # position t's range
    manifest["encoder"]["per_token"] = "yes"
    (tmp_path / "tok" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="encoder: per_token: expected true or false"):
        Engine.load(tmp_path / "tok", device="cpu")


def test_encoder_quantizer_fields_are_required_and_checked(saved):
    path, encoder = saved
    manifest = json.loads((path / "manifest.json").read_text())
    loaded = Engine.load(path, device="cpu").encoder
    assert isinstance(loaded.quantizer, ProductQuantizer) and torch.equal(loaded(features(5)), encoder(features(5)))
    assert set(loaded.state_dict()) == set(encoder.state_dict())
    assert not any("cluster_size" in name or "embed_sum" in name for name in encoder.state_dict())  # serving tensors only
    missing = json.loads(json.dumps(manifest))
    del missing["encoder"]["quantizer"]
    (path / "manifest.json").write_text(json.dumps(missing))
    with pytest.raises(ValueError, match="encoder: expected fields"):
        Engine.load(path, device="cpu")
    for bad in ("lattice", ["residual"]):
        manifest["encoder"]["quantizer"] = bad
        (path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="encoder: quantizer: expected one of"):
            Engine.load(path, device="cpu")


def test_index_without_encoder_loads_without_one(tmp_path):
    random_index(16, N_ITEMS, 10, seed=0).save(tmp_path / "plain")
    engine = Engine.load(tmp_path / "plain", device="cpu")
    assert engine.encoder is None
    with pytest.raises(TypeError, match="batch: .*no encoder"):
        engine.search(features(2), k=3)


def test_bad_features_are_named(saved):
    engine = Engine.load(saved[0], device="cpu", backend="torch")
    with pytest.raises(ValueError, match=r"batch: expected query features of shape \(B, 6 history items \+ 2"):
        engine.search(torch.zeros(2, 7), k=3)
    bad = features(2)
    bad[0, 0] = N_ITEMS
    with pytest.raises(ValueError, match="history item ids must lie in"):
        engine.search(bad, k=3)
    bad = features(2)
    bad[1, HISTORY + 1] = 5
    with pytest.raises(ValueError, match="user feature 1 must lie in"):
        engine.search(bad, k=3)
    bad = features(2)
    bad[0, 1] = 0.5
    with pytest.raises(ValueError, match="whole numbers"):
        engine.search(bad, k=3)


def test_damaged_encoder_file_is_refused(saved):
    path, _ = saved
    file = path / "encoder.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="encoder.safetensors: sha256 differs"):
        Engine.load(path, device="cpu")
    file.unlink()
    with pytest.raises(ValueError, match="encoder.safetensors: missing"):
        Engine.load(path, device="cpu")


def test_encoder_config_that_does_not_match_its_weights_is_refused(saved):
    path, _ = saved
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["encoder"]["hidden"] = [32]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"encoder.safetensors: tokenizer\.\w+.*weight: .* differs from the config"):
        Engine.load(path, device="cpu")
    manifest["encoder"]["hidden"] = ["os.system('x')"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="encoder: hidden: expected a positive integer"):
        Engine.load(path, device="cpu")
    del manifest["encoder"]["history"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="encoder: expected fields"):
        Engine.load(path, device="cpu")


def test_encoder_with_another_code_space_is_refused_on_save(tmp_path):
    index = random_index(16, N_ITEMS, 10, seed=0)
    with pytest.raises(ValueError, match="encoder: makes 64 codes but the index has 16"):
        index.save(tmp_path / "x", encoder=make_encoder(n_words=8))
    with pytest.raises(TypeError, match="encoder: expected a QueryEncoder"):
        index.save(tmp_path / "x", encoder=torch.nn.Linear(2, 2))
    assert not (tmp_path / "x").exists()
