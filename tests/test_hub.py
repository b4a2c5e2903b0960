"""Offline, Hugging Face hub access fails at once (one connection attempt, no retries) with one sentence."""

import socket

import pytest

import tinylm.hub as hub
from tinylm.cli import main


@pytest.fixture
def unreachable_network(monkeypatch):
    """No offline variable set, and every TCP connection refused; returns the list of attempted addresses."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(101, "Network is unreachable")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hub, "_reachable", {})
    # The libraries copied the offline setting at import (conftest sets it); start from "online".
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    try:
        import datasets.config as datasets_config

        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", False, raising=False)
    except ImportError:
        pass
    return attempts


def test_probe_reports_unreachable_and_switches_to_offline_mode(unreachable_network):
    import huggingface_hub.constants as hub_constants

    assert hub.offline_reason() == "the Hugging Face hub (huggingface.co:443) cannot be reached"
    assert hub_constants.HF_HUB_OFFLINE and unreachable_network == [("huggingface.co", 443)]


def test_prepare_hf_offline_is_one_sentence_without_retries(unreachable_network, capsys, tmp_path):
    pytest.importorskip("datasets")
    code = main(
        ["prepare", "hf:tinylm-tests/not-cached", "--tokenizer", "char", "--out", str(tmp_path / "d")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "not in the local Hugging Face cache" in err and "cannot be reached" in err
    assert len(unreachable_network) == 1  # the probe only: the old code retried six times with back-off


def test_gpt2_tokenizer_offline_is_one_sentence_without_retries(unreachable_network):
    pytest.importorskip("transformers")
    from tinylm.errors import TinyLMError
    from tinylm.tokenizer import HFTokenizer

    try:
        tok = HFTokenizer.gpt2()  # a machine with GPT-2's files cached loads them offline
        assert tok.vocab_size == 50257
    except TinyLMError as exc:
        assert "cannot be reached and it is not in the local cache" in str(exc)
    assert len(unreachable_network) == 1


def test_harness_offline_is_one_sentence_without_retries(unreachable_network, tiny_run, capsys):
    pytest.importorskip("lm_eval")
    code = main(["harness", str(tiny_run), "--tasks", "hellaswag", "--limit", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "hellaswag" in err and "cannot be reached" in err
    assert len(unreachable_network) == 1
